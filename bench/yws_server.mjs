// Baseline: the y-websocket server (@y/websocket-server), one process, on loopback.
//   node yws_server.mjs [ROOM=FILE ...]
// Each ROOM=FILE argument makes the server hold that room's document from the start
// (FILE: one Yjs update, the whole history; S8 and S9). Prints {"event": "listening",
// "url"} once it accepts connections; exits on end of input.
import fs from 'node:fs'
import http from 'node:http'
import { WebSocketServer } from 'ws'
import * as Y from 'yjs'
import { getYDoc, setupWSConnection } from '@y/websocket-server/utils'

const t0 = Date.now()
for (const arg of process.argv.slice(2)) {
  const [room, file] = arg.split('=')
  Y.applyUpdate(getYDoc(room), fs.readFileSync(file))
}
const loadSeconds = (Date.now() - t0) / 1000

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
  console.log(JSON.stringify({ event: 'listening', url: `ws://127.0.0.1:${port}`, load_s: loadSeconds }))
})
process.stdin.on('data', () => {})
process.stdin.on('end', () => process.exit(0))
