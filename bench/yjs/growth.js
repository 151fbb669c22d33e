#!/usr/bin/env node
// How a server's cost follows the size of its documents: N rooms x K providers typing at a
// constant rate into the same rooms, window after window; prints, per window, the rooms' text
// length and the server's user and system CPU (/proc/PID/stat), and checks every delivery and
// convergence as loadgen.js does. Not part of scripts/bench-yjs.sh (whose sweep types every step
// into new rooms); start a server as that script does, then for instance:
//   taskset -c 0 node bench/yjs/growth.js --url ws://127.0.0.1:PORT/yjs --server-pid PID \
//       [--protocol yws|hocuspocus] [--rate 150] [--windows 10] [--seconds 3] [--docs 20] [--providers 5]
import { readFileSync } from 'node:fs'
import { Fleet } from './fleet.js'

const o = { url: null, serverPid: null, protocol: 'yws', rate: 150, windows: 10, seconds: 3, docs: 20, providers: 5 }
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i += 2) {
  const k = argv[i].replace(/^--/, '').replace(/-(.)/g, (_, c) => c.toUpperCase())
  if (!(k in o) || i + 1 >= argv.length) {
    console.error(`unknown or incomplete option ${argv[i]}`)
    process.exit(2)
  }
  o[k] = k === 'url' || k === 'protocol' ? argv[i + 1] : Number(argv[i + 1])
}
if (o.url === null || o.serverPid === null) {
  console.error('usage: node growth.js --url ws://HOST:PORT/yjs --server-pid PID [--protocol yws|hocuspocus] [--rate R] [--windows N] [--seconds S] [--docs N] [--providers K]')
  process.exit(2)
}
const cpu = (pid) => {
  const st = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const f = st.slice(st.lastIndexOf(')') + 2).split(' ')
  return [Number(f[11]) / 100, Number(f[12]) / 100]
}
const u = new URL(o.url)
const fleet = new Fleet({
  protocol: o.protocol, host: u.hostname, port: Number(u.port),
  path: o.protocol === 'hocuspocus' ? '/' : u.pathname.replace(/\/$/, ''), token: 'bench',
})
const run = process.pid.toString(36)
await fleet.connect({ group: 'g', rooms: Array.from({ length: o.docs }, (_, i) => `growth-${run}-d${i}`), k: o.providers })
console.log('| window | chars a room | server user % | server sys % | generator % | deliveries | max latency ms | converged |')
console.log('|---:|---:|---:|---:|---:|---:|---:|---|')
for (let w = 0; w < o.windows; w++) {
  const t = performance.timeOrigin + performance.now() + 10
  const s0 = cpu(o.serverPid)
  const g0 = cpu('self')
  const r = await fleet.window({ group: 'g', rate: o.rate, tStart: t, tMeasure: t, tEnd: t + o.seconds * 1000, drainMs: 5000 })
  const s1 = cpu(o.serverPid)
  const g1 = cpu('self')
  const v = await fleet.verify({ group: 'g' })
  const pct = (a, b) => ((100 * (b - a)) / o.seconds).toFixed(1)
  console.log(`| ${w} | ${Math.round(v.chars / v.rooms)} | ${pct(s0[0], s1[0])} | ${pct(s0[1], s1[1])} | ${pct(g0[0] + g0[1], g1[0] + g1[1])} | ` +
    `${r.delivered}/${r.expected} | ${r.maxLat.toFixed(1)} | ${v.mismatched === 0 && v.short === 0 ? 'yes' : 'NO'} |`)
}
process.exit(0)
