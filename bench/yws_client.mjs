// Baseline: one device as a y-websocket client (Node.js), syncing a Y.Doc through the
// server.   node yws_client.mjs URL COUNT TOTAL SEED
// Prints {"event": "ready"} once synced; on the stdin line "go" sends COUNT messages
// (each one Y.Map set in its own transaction: one update on the wire), waits until its map
// holds TOTAL entries, prints {"event": "done", ...} with wall-clock timestamps and the
// websocket bytes it sent and received; exits on end of input.
import readline from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const [url, count, total, seed] = process.argv.slice(2)
const COUNT = parseInt(count)
const TOTAL = parseInt(total)

// a small seeded generator (mulberry32): the same kind of workload as the Python side
let s = parseInt(seed) >>> 0
const rand = () => {
  s = (s + 0x6d2b79f5) >>> 0
  let t = s
  t = Math.imul(t ^ (t >>> 15), t | 1)
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}
const pick = (alphabet, k) => {
  let out = ''
  for (let i = 0; i < k; i++) out += alphabet[Math.floor(rand() * alphabet.length)]
  return out
}
const BODY = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 '
const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
const device = ('device' + String(seed).padStart(10, '0')).slice(-16)
const values = []
for (let i = 0; i < COUNT; i++) {
  const id = pick('abcdefghijklmnopqrstuvwxyz234567', 16)
  values.push([id, {
    id,
    k: 'msg',
    a: 'accountaccountac',
    d: device,
    ts: `${String(1767225600000 + i).padStart(13, '0')}.${String(i % 1000000).padStart(6, '0')}`,
    t: '',
    b: pick(BODY, 120),
    sig: pick(B64, 86) + '=='
  }])
}

const traffic = { bytes_in: 0, bytes_out: 0 }
class CountingSocket extends WebSocket {
  constructor (...args) {
    super(...args)
    this.on('message', data => { traffic.bytes_in += data.byteLength ?? data.length })
  }

  send (data, ...rest) {
    traffic.bytes_out += data.byteLength ?? data.length
    return super.send(data, ...rest)
  }
}

const say = obj => console.log(JSON.stringify(obj))
const doc = new Y.Doc()
const map = doc.getMap('m')
const provider = new WebsocketProvider(url, 'chat', doc, {
  WebSocketPolyfill: CountingSocket,
  disableBc: true
})

const lines = readline.createInterface({ input: process.stdin })
lines.on('close', () => { provider.destroy(); process.exit(0) })

let start = 0
provider.once('sync', () => {
  start = map.size
  say({ event: 'ready', held: start })
})

let base = { ...traffic }
lines.on('line', line => {
  if (line.trim() === 'stats') { // asked once every client is done
    say({
      event: 'stats',
      traffic: { bytes_in: traffic.bytes_in - base.bytes_in, bytes_out: traffic.bytes_out - base.bytes_out }
    })
    return
  }
  if (line.trim() !== 'go') return
  base = { ...traffic }
  const tGo = Date.now() / 1000
  const cpu0 = process.cpuUsage()
  let i = 0
  const step = () => {
    const end = Math.min(i + 50, values.length)
    for (; i < end; i++) map.set(values[i][0], values[i][1])
    if (i < values.length) {
      setImmediate(step)
      return
    }
    const tSent = Date.now() / 1000
    const poll = setInterval(() => {
      if (map.size < TOTAL + start) return
      clearInterval(poll)
      say({
        event: 'done',
        sent: COUNT,
        t_go: tGo,
        t_sent: tSent,
        t_held: Date.now() / 1000,
        cpu_total: (({ user, system }) => (user + system) / 1e6)(process.cpuUsage(cpu0)),
        traffic: { bytes_in: traffic.bytes_in - base.bytes_in, bytes_out: traffic.bytes_out - base.bytes_out },
        peak_rss_mb: process.resourceUsage().maxRSS / 1024
      })
    }, 2)
  }
  step()
})
