#!/usr/bin/env node
// Prints the markdown table of scripts/bench-yjs.sh from the JSON files loadgen.js wrote.
//   node report.js target/bench/yjs/docrelay.json target/bench/yjs/y-websocket.json ...
import { readFileSync } from 'node:fs'

const files = process.argv.slice(2)
if (files.length === 0) {
  console.error('usage: node report.js RESULT.json...')
  process.exit(2)
}
const results = files.map((f) => JSON.parse(readFileSync(f, 'utf8')))

const n = (x, d = 0) => (x === null || x === undefined || Number.isNaN(x) ? '-' : Number(x).toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d }))
const ms = (x) => (x === null || x === undefined ? '-' : `${n(x, x < 10 ? 2 : 1)} ms`)

const p = results[0].params
console.log(`${p.docs} documents x ${p.providers} providers; fixed rate ${p.rate} inserts/s per provider ` +
  `(${n(p.rate * p.docs * p.providers)} updates/s, ${n(p.rate * p.docs * p.providers * (p.providers - 1))} deliveries/s), ` +
  `${p.window} s measured; sweep from ${p.sweepStart}/s doubling, ${p.bisect} bisections, ${p.sweepWindow} s a step, ` +
  `a step holds with p99 <= ${p.maxP99} ms and >= 99% delivered within ${p.drain} ms; RSS over ${n(p.idleConns)} idle connections`)
console.log()
console.log('| server | deliveries/s at p99 <= 50 ms | p99 there | p99 at fixed rate | server CPU % at fixed rate | generator CPU % at fixed rate | server CPU % at max | generator CPU % at max | RSS per connection KiB | lost deliveries | converged |')
console.log('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|')
const notes = []
for (const r of results) {
  const f = r.fixed
  const b = r.best
  const windows = [f, ...(r.sweep ?? [])].filter(Boolean)
  const expected = windows.reduce((a, s) => a + s.expected, 0)
  const lost = windows.reduce((a, s) => a + s.lost, 0)
  const converged = windows.length > 0 && windows.every((s) => s.converged)
  let max = b ? n(b.deliveriesPerSec) : '-'
  if (b && r.firstFailing === null) max = `>= ${max}`
  if (b && b.generatorCpuPct >= b.serverCpuPct) {
    max += ' †'
    notes.push(`† ${r.name}: at that rate the generator used ${n(b.generatorCpuPct, 1)}% CPU, the server ${n(b.serverCpuPct, 1)}%: the generator is not the cheaper side there, so the figure is a lower bound for the server.`)
  }
  console.log(`| ${r.name} | ${max} | ${b ? ms(b.latencyMs.p99) : '-'} | ${f ? ms(f.latencyMs.p99) : '-'} | ` +
    `${f ? n(f.serverCpuPct, 1) : '-'} | ${f ? n(f.generatorCpuPct, 1) : '-'} | ${b ? n(b.serverCpuPct, 1) : '-'} | ${b ? n(b.generatorCpuPct, 1) : '-'} | ` +
    `${r.rss ? n(r.rss.perConnKiB, 1) : '-'} | ${n(lost)} of ${n(expected)} | ${converged ? 'yes' : 'NO'} |`)
  if (r.firstFailing) {
    const s = r.firstFailing
    notes.push(`${r.name}: first failing rate ${n(s.rate, 1)}/s per provider (${n(s.deliveriesPerSec)} deliveries/s): ${s.failed.join(', ')}; server ${n(s.serverCpuPct, 1)}%, generator ${n(s.generatorCpuPct, 1)}% CPU.`)
  }
  for (const e of r.errors ?? []) notes.push(`${r.name}: ${e}`)
}
if (notes.length) {
  console.log()
  for (const x of notes) console.log(`- ${x}`)
}
