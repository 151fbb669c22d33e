#!/usr/bin/env node
// Starts one of the two reference Yjs servers on 127.0.0.1 for scripts/bench-yjs.sh:
//
//   node servers.js y-websocket [--port 0]   @y/websocket-server 0.1.5: its own setupWSConnection
//                                           (the room is the URL path, as in its bin/server.js),
//                                           no persistence, no callback, gc on (its defaults)
//   node servers.js hocuspocus [--port 0]    @hocuspocus/server 4.7.0: `new Server({...})` with no
//                                           extensions and no hooks, so onStoreDocument is the
//                                           built-in no-op (still debounced: debounce 2000 ms,
//                                           maxDebounce 10000 ms); flushDelay 0 (its default:
//                                           updates arriving in one event-loop turn are merged
//                                           into one broadcast); quiet
//
// Prints `listening on 127.0.0.1:PORT` on stderr once it accepts connections (the line the
// driver reads, the same as docrelay's), and exits on SIGTERM/SIGINT.
import http from 'node:http'
import { createRequire } from 'node:module'

const kind = process.argv[2]
let port = 0
for (let i = 3; i < process.argv.length; i++) {
  if (process.argv[i] === '--port') port = Number(process.argv[++i])
  else {
    console.error(`unknown argument ${process.argv[i]}`)
    process.exit(2)
  }
}

const announce = (addr) => console.error(`listening on 127.0.0.1:${addr.port}`)

if (kind === 'y-websocket') {
  // The same wiring as @y/websocket-server's src/server.js, with host and port given here.
  // Its own `ws` (6.x, as its package.json asks), not whatever else is installed here.
  const here = createRequire(import.meta.url)
  const WebSocketServer = createRequire(here.resolve('@y/websocket-server/package.json'))('ws').Server
  const { setupWSConnection } = await import('@y/websocket-server/utils')
  const wss = new WebSocketServer({ noServer: true })
  const server = http.createServer((_req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain' })
    res.end('okay')
  })
  wss.on('connection', setupWSConnection)
  server.on('upgrade', (req, socket, head) => {
    wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req))
  })
  server.listen(port, '127.0.0.1', () => announce(server.address()))
  const stop = () => process.exit(0)
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
} else if (kind === 'hocuspocus') {
  const { Server } = await import('@hocuspocus/server')
  const server = new Server({ port, address: '127.0.0.1', quiet: true, stopOnSignals: false })
  await server.listen()
  announce(server.address)
  const stop = () => process.exit(0)
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
} else {
  console.error('usage: node servers.js y-websocket|hocuspocus [--port N]')
  process.exit(2)
}
