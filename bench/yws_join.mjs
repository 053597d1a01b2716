// Baseline: one device joining y-websocket rooms (Node.js), for S8 and S9.
//   node yws_join.mjs URL ROOM[=FILE] ...
// One Y.Doc and one WebsocketProvider per room; a room given as ROOM=FILE starts from
// that file (one Yjs update: the device already holds the history). Prints
// {"event": "synced", "sizes": {room: entries in map m}} once every room has synced
// (the server's whole answer applied); on the stdin line "send N" sets N new entries,
// spread over the rooms, and prints {"event": "sent"}; "stats" prints its memory; exits
// on end of input.
import fs from 'node:fs'
import readline from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const [url, ...rooms] = process.argv.slice(2)
const say = obj => console.log(JSON.stringify(obj))
const memory = () => ({
  rss_mb: process.memoryUsage().rss / 1048576,
  peak_rss_mb: process.resourceUsage().maxRSS / 1024
})

const joined = rooms.map(arg => {
  const [room, file] = arg.split('=')
  const doc = new Y.Doc()
  if (file) Y.applyUpdate(doc, fs.readFileSync(file))
  return { room, doc, map: doc.getMap('m') }
})
const loaded = Date.now() / 1000
let waiting = joined.length
for (const j of joined) {
  j.provider = new WebsocketProvider(url, j.room, j.doc, { WebSocketPolyfill: WebSocket, disableBc: true })
  j.provider.once('sync', () => {
    waiting -= 1
    if (waiting > 0) return
    say({
      event: 'synced',
      t_loaded: loaded,
      t_synced: Date.now() / 1000,
      sizes: Object.fromEntries(joined.map(x => [x.room, x.map.size])),
      ...memory()
    })
  })
}

let sent = 0
const lines = readline.createInterface({ input: process.stdin })
lines.on('close', () => { for (const j of joined) j.provider.destroy(); process.exit(0) })
lines.on('line', line => {
  const [op, count] = line.trim().split(' ')
  if (op === 'stats') say({ event: 'stats', ...memory() })
  if (op !== 'send') return
  for (let i = 0; i < parseInt(count); i++, sent++) {
    const j = joined[sent % joined.length]
    const id = `live${String(sent).padStart(12, '0')}`
    j.map.set(id, { id, k: 'msg', a: 'accountaccountac', d: 'device0000000000', ts: String(Date.now()), t: '', b: 'x'.repeat(120), sig: 'y'.repeat(88) })
  }
  say({ event: 'sent', sent })
})
