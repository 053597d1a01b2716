// Baseline: the y-websocket server (@y/websocket-server), one process, on loopback.
// Prints {"event": "listening", "url"} once it accepts connections; exits on end of input.
import http from 'node:http'
import { WebSocketServer } from 'ws'
import { setupWSConnection } from '@y/websocket-server/utils'

const wss = new WebSocketServer({ noServer: true })
wss.on('connection', setupWSConnection)
const server = http.createServer((_req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain' })
  res.end('okay')
})
server.on('upgrade', (req, socket, head) => {
  wss.handleUpgrade(req, socket, head, ws => wss.emit('connection', ws, req))
})
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address()
  console.log(JSON.stringify({ event: 'listening', url: `ws://127.0.0.1:${port}` }))
})
process.stdin.on('data', () => {})
process.stdin.on('end', () => process.exit(0))
