#!/usr/bin/env node
// Load generator for scripts/bench-yjs.sh: N rooms with K typing providers each, against one Yjs
// server (docrelay's /yjs route, @y/websocket-server or Hocuspocus). See fleet.js for what a
// provider does and how latency and convergence are measured.
//
//   node loadgen.js --url ws://127.0.0.1:PORT/yjs --protocol yws --server-pid PID [options]
//
// Phases, all against the same server process:
//   1. connect     N x K providers (synced, awareness sent, one marker typed by each)
//   2. rss         RSS of the server before and after --idle-conns more providers (in rooms of K,
//                  synced, not typing) connect: (after - before) / idle-conns, then those close;
//                  with --idle-conns 0 the N x K providers are counted instead
//   3. fixed       --rate inserts/s per provider for --window s (after --warmup s): p50/p99 of the
//                  delivery latency, server and generator CPU over the measured seconds,
//                  deliveries lost, convergence
//   4. sweep       the rate doubled per step from --sweep-start until a step fails (p99 over
//                  --max-p99 ms, under 99% delivered within --drain ms, a delivery lost, the
//                  rooms not converged, or the generator sending under 95% of the rate asked;
//                  a failing step is measured --retries more times before it counts), then
//                  bisected --bisect times between the last step that held and the first that
//                  failed; each step --sweep-window s. The best step that held is the result.
// Every window after the first types into N new rooms (the old providers close first), so that
// each window starts from empty documents whatever came before it (--keep-rooms: the same rooms).
// Every window also reports the generator's own CPU and how late its send timer ran (a stalled
// generator inflates latency: on a shared machine, other processes on its CPU do that).
// Prints progress on stderr and one JSON object on stdout (or into --json FILE).
import { readFileSync, writeFileSync } from 'node:fs'
import { Worker } from 'node:worker_threads'
import { fileURLToPath } from 'node:url'
import { Fleet, BUCKETS, BUCKET_MS } from './fleet.js'

const HELP = `usage: node loadgen.js --url ws://HOST:PORT[/PATH] --server-pid PID [options]
  --protocol yws|hocuspocus   wire protocol (default yws)
  --name NAME                 label for the output (default: the protocol)
  --docs N                    rooms typed in (default 20)
  --providers K               providers per room (default 5)
  --rate R                    inserts/s per provider in the fixed-rate window (default 10)
  --window S                  measured seconds of the fixed-rate window (default 5)
  --warmup S                  seconds typed before the fixed window's measured part (default 2)
  --sweep-start R             first rate of the sweep (default: 2 x --rate)
  --sweep-window S            measured seconds of each sweep step (default 3)
  --sweep-warmup S            warm-up seconds of each sweep step (default 0.5)
  --max-steps N               most doubling steps (default 12)
  --bisect N                  bisections after the first failing step (default 2)
  --retries N                 a failing step is measured up to N more times (default 1)
  --max-p99 MS                p99 bound of a step that holds (default 50)
  --drain MS                  how long deliveries may trail the end of a window (default 3000)
  --idle-conns N              providers connected for the RSS measurement (default 1000)
  --workers W                 generator threads, rooms split between them (default 1)
  --token T                   token (default bench)
  --no-sweep                  skip phase 4
  --keep-rooms                type every window into the same rooms (default: new rooms for
                              every window after the first, so that none starts with the text
                              of the windows before it)
  --json FILE                 write the result there instead of stdout`

function parseArgs (argv) {
  const o = {
    url: null, protocol: 'yws', name: null, serverPid: null, docs: 20, providers: 5, rate: 10, window: 5,
    warmup: 2, sweepStart: null, sweepWindow: 3, sweepWarmup: 0.5, maxSteps: 12, bisect: 2, maxP99: 50,
    drain: 3000, idleConns: 1000, workers: 1, token: 'bench', sweep: true, json: null, retries: 1, freshRooms: true,
  }
  const num = (v, k) => {
    const n = Number(v)
    if (!Number.isFinite(n)) throw new Error(`--${k}: not a number: ${v}`)
    return n
  }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`)
      return argv[++i]
    }
    switch (a) {
      case '--url': o.url = v(); break
      case '--protocol': o.protocol = v(); break
      case '--name': o.name = v(); break
      case '--server-pid': o.serverPid = num(v(), 'server-pid'); break
      case '--docs': o.docs = num(v(), 'docs'); break
      case '--providers': o.providers = num(v(), 'providers'); break
      case '--rate': o.rate = num(v(), 'rate'); break
      case '--window': o.window = num(v(), 'window'); break
      case '--warmup': o.warmup = num(v(), 'warmup'); break
      case '--sweep-start': o.sweepStart = num(v(), 'sweep-start'); break
      case '--sweep-window': o.sweepWindow = num(v(), 'sweep-window'); break
      case '--sweep-warmup': o.sweepWarmup = num(v(), 'sweep-warmup'); break
      case '--max-steps': o.maxSteps = num(v(), 'max-steps'); break
      case '--bisect': o.bisect = num(v(), 'bisect'); break
      case '--retries': o.retries = num(v(), 'retries'); break
      case '--max-p99': o.maxP99 = num(v(), 'max-p99'); break
      case '--drain': o.drain = num(v(), 'drain'); break
      case '--idle-conns': o.idleConns = num(v(), 'idle-conns'); break
      case '--workers': o.workers = num(v(), 'workers'); break
      case '--token': o.token = v(); break
      case '--no-sweep': o.sweep = false; break
      case '--keep-rooms': o.freshRooms = false; break
      case '--json': o.json = v(); break
      case '-h': case '--help': console.log(HELP); process.exit(0); break
      default: throw new Error(`unknown option ${a}\n${HELP}`)
    }
  }
  if (o.url === null || o.serverPid === null) throw new Error(`--url and --server-pid are required\n${HELP}`)
  if (o.protocol !== 'yws' && o.protocol !== 'hocuspocus') throw new Error('--protocol: yws or hocuspocus')
  if (o.providers < 2) throw new Error('--providers: at least 2')
  o.name ??= o.protocol
  o.sweepStart ??= 2 * o.rate
  return o
}

// ---- /proc ---------------------------------------------------------------------------------

const TICK = 100 // USER_HZ: /proc/PID/stat counts CPU time in 1/100 s on Linux
function cpuTimes (pid) { // [user, system] seconds
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ') // f[0] is field 3 (state)
  return [Number(f[11]) / TICK, Number(f[12]) / TICK] // utime, stime (fields 14, 15)
}
function rssKiB (pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  return m ? Number(m[1]) : NaN
}

// ---- fleets (in this thread, or one per worker) ----------------------------------------------

class RemoteFleet {
  constructor (opts) {
    this.worker = new Worker(fileURLToPath(new URL('./fleet-worker.js', import.meta.url)), { workerData: opts })
    this.next = 0
    this.pending = new Map()
    this.worker.on('message', ({ id, ok, result, error }) => {
      const p = this.pending.get(id)
      this.pending.delete(id)
      if (ok) p.resolve(result)
      else p.reject(new Error(error))
    })
    this.worker.on('error', (e) => { for (const p of this.pending.values()) p.reject(e) })
  }

  call (cmd, args) {
    const id = this.next++
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject })
      this.worker.postMessage({ id, cmd, args })
    })
  }
}
const LOCAL_CMDS = ['connect', 'disconnect', 'window', 'settle', 'verify']

function makeFleets (o) {
  const u = new URL(o.url)
  const fopts = {
    protocol: o.protocol,
    host: u.hostname,
    port: Number(u.port),
    path: (u.pathname === '/' ? '' : u.pathname.replace(/\/$/, '')) || (o.protocol === 'hocuspocus' ? '/' : ''),
    token: o.token,
  }
  if (o.workers <= 1) {
    const f = new Fleet(fopts)
    return [{ call: (cmd, args) => { if (!LOCAL_CMDS.includes(cmd)) throw new Error(cmd); return f[cmd](args) } }]
  }
  return Array.from({ length: o.workers }, () => new RemoteFleet(fopts))
}

function split (names, n) {
  const parts = Array.from({ length: n }, () => [])
  names.forEach((name, i) => parts[i % n].push(name))
  return parts
}

// ---- latency ---------------------------------------------------------------------------------

function percentiles (hists, maxLat) {
  const h = new Float64Array(BUCKETS)
  let total = 0
  for (const x of hists) for (let i = 0; i < BUCKETS; i++) if (x[i] !== 0) { h[i] += x[i]; total += x[i] }
  const at = (q) => {
    if (total === 0) return null
    const want = Math.ceil(q * total)
    let acc = 0
    for (let i = 0; i < BUCKETS; i++) {
      acc += h[i]
      if (acc >= want) return i === BUCKETS - 1 ? maxLat : (i + 1) * BUCKET_MS // the bucket's upper edge
    }
    return maxLat
  }
  return { count: total, p50: at(0.5), p90: at(0.9), p99: at(0.99), p999: at(0.999), max: total ? maxLat : null }
}

// ---- main ------------------------------------------------------------------------------------

const log = (...a) => console.error(`[${o?.name ?? 'loadgen'}]`, ...a)
let o
try {
  o = parseArgs(process.argv.slice(2))
} catch (e) {
  console.error(e.message)
  process.exit(2)
}

const run = `${process.pid.toString(36)}${Date.now().toString(36).slice(-4)}`
const fleets = makeFleets(o)
const W = fleets.length
const all = (cmd, argsFor) => Promise.all(fleets.map((f, w) => f.call(cmd, argsFor(w))))
const sum = (rs, k) => rs.reduce((a, r) => a + r[k], 0)
const nowEpoch = () => performance.timeOrigin + performance.now()
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

const mainRooms = split(Array.from({ length: o.docs }, (_, i) => `bench-${run}-s0-d${i}`), W)
const result = { name: o.name, protocol: o.protocol, params: { ...o }, run, errors: [] }
delete result.params.json

// Every window after the first types into new rooms (--fresh-rooms, the default), so that each
// one measures the same thing: N rooms typed into from empty, whatever came before it.
let roomSet = 0
let roomsUsed = false
async function freshRooms () {
  await all('disconnect', () => ({ group: 'main' }))
  roomSet++
  const names = split(Array.from({ length: o.docs }, (_, i) => `bench-${run}-s${roomSet}-d${i}`), W)
  const c = await all('connect', (w) => ({ group: 'main', rooms: names[w], k: o.providers }))
  result.errors.push(...c.flatMap((x) => x.errors))
  await sleep(300)
}

async function window (rate, measuredS, warmupS) {
  if (roomsUsed && o.freshRooms) await freshRooms()
  roomsUsed = true
  const tStart = nowEpoch() + 50
  const tMeasure = tStart + warmupS * 1000
  const tEnd = tMeasure + measuredS * 1000
  const cpu = {}
  const at = (t, f) => setTimeout(f, Math.max(0, t - nowEpoch()))
  at(tMeasure, () => {
    cpu.t0 = nowEpoch()
    cpu.s0 = cpuTimes(o.serverPid)
    cpu.g0 = cpuTimes('self')
  })
  at(tEnd, () => {
    cpu.t1 = nowEpoch()
    cpu.s1 = cpuTimes(o.serverPid)
    cpu.g1 = cpuTimes('self')
  })
  const rs = await all('window', (w) => ({ group: 'main', rate, tStart, tMeasure, tEnd, drainMs: o.drain }))
  while (cpu.s1 === undefined) await sleep(5)
  const wall = (cpu.t1 - cpu.t0) / 1000
  const lat = percentiles(rs.map((r) => r.hist), Math.max(...rs.map((r) => r.maxLat)))
  const s = {
    rate,
    targetUpdatesPerSec: rate * o.docs * o.providers,
    updatesPerSec: sum(rs, 'measuredSent') / measuredS,
    deliveriesPerSec: sum(rs, 'measured') / measuredS,
    sent: sum(rs, 'sent'),
    expected: sum(rs, 'expected'),
    delivered: sum(rs, 'delivered'),
    measuredExpected: sum(rs, 'measuredExpected'),
    measuredDelivered: sum(rs, 'measured'),
    latencyMs: lat,
    serverCpuPct: (100 * (cpu.s1[0] + cpu.s1[1] - cpu.s0[0] - cpu.s0[1])) / wall,
    serverSysPct: (100 * (cpu.s1[1] - cpu.s0[1])) / wall,
    generatorCpuPct: (100 * (cpu.g1[0] + cpu.g1[1] - cpu.g0[0] - cpu.g0[1])) / wall,
    generatorSysPct: (100 * (cpu.g1[1] - cpu.g0[1])) / wall,
    generatorLateMaxMs: Math.max(...rs.map((r) => r.lateMaxMs)),
    drainMs: Math.max(...rs.map((r) => r.drainMs)),
    echoes: sum(rs, 'echoes'),
    syncStatus: sum(rs, 'syncStatus'),
    gaps: sum(rs, 'gaps'),
    dups: sum(rs, 'dups'),
    bogus: sum(rs, 'bogus'),
    messages: sum(rs, 'messages'),
    errors: rs.flatMap((r) => r.errors).slice(0, 10),
  }
  s.deliveredInTime = s.delivered // within --drain ms of the window's end
  if (s.delivered < s.expected) {
    // Late or lost: wait for stragglers (a saturated server drains its backlog), then count again.
    const st = await all('settle', () => ({ group: 'main', timeoutMs: 15000 }))
    s.settled = st.every((x) => x.settled)
    s.delivered = sum(st, 'delivered')
  }
  s.lost = s.expected - s.delivered
  const v = await all('verify', () => ({ group: 'main' }))
  s.docChars = sum(v, 'chars') / sum(v, 'rooms') // each room's text length at the end of the window
  s.verify = { rooms: sum(v, 'rooms'), mismatched: sum(v, 'mismatched'), short: sum(v, 'short'), examples: v.flatMap((x) => x.examples), ms: Math.max(...v.map((x) => x.ms)) }
  s.converged = s.verify.mismatched === 0 && s.verify.short === 0
  return s
}

function holds (s) {
  const why = []
  if (s.latencyMs.p99 === null || s.latencyMs.p99 > o.maxP99) why.push(`p99 ${fmt(s.latencyMs.p99)} ms > ${o.maxP99}`)
  if (s.deliveredInTime < 0.99 * s.expected) why.push(`${s.deliveredInTime}/${s.expected} delivered within ${o.drain} ms`)
  if (s.lost > 0) why.push(`${s.lost} deliveries lost`)
  if (s.updatesPerSec < 0.95 * s.targetUpdatesPerSec) why.push(`generator sent ${Math.round(s.updatesPerSec)}/s of ${s.targetUpdatesPerSec}/s`)
  if (!s.converged) why.push('not converged')
  return why
}
const fmt = (x, d = 2) => (x === null || x === undefined ? '-' : Number(x).toFixed(d))
const line = (s) => `rate ${fmt(s.rate, 1)}/s/provider: ${Math.round(s.deliveriesPerSec)} deliveries/s, ${Math.round(s.docChars)} chars a room, p50 ${fmt(s.latencyMs.p50)} p99 ${fmt(s.latencyMs.p99)} max ${fmt(s.latencyMs.max)} ms, server ${fmt(s.serverCpuPct, 1)}% (sys ${fmt(s.serverSysPct, 1)}) gen ${fmt(s.generatorCpuPct, 1)}% (sys ${fmt(s.generatorSysPct, 1)}) CPU, gen late ${fmt(s.generatorLateMaxMs, 1)} ms, lost ${s.lost}, ${s.converged ? 'converged' : 'NOT converged'} (verify ${Math.round(s.verify.ms)} ms)`

try {
  // 1. connect
  const rss0 = rssKiB(o.serverPid)
  const c = await all('connect', (w) => ({ group: 'main', rooms: mainRooms[w], k: o.providers }))
  result.connect = { providers: sum(c, 'providers'), ms: Math.max(...c.map((x) => x.ms)) }
  result.errors.push(...c.flatMap((x) => x.errors))
  await sleep(1000)
  const rss1 = rssKiB(o.serverPid)
  log(`connected ${result.connect.providers} providers in ${Math.round(result.connect.ms)} ms; server RSS ${rss0} -> ${rss1} KiB`)

  // 2. rss
  result.rss = { beforeKiB: rss0, afterMainKiB: rss1, mainPerConnKiB: (rss1 - rss0) / result.connect.providers }
  if (o.idleConns > 0) {
    const k = o.providers
    const idleRooms = split(Array.from({ length: Math.ceil(o.idleConns / k) }, (_, i) => `bench-${run}-i${i}`), W)
    const ic = await all('connect', (w) => ({ group: 'idle', rooms: idleRooms[w], k }))
    const n = sum(ic, 'providers')
    await sleep(1000)
    const rss2 = rssKiB(o.serverPid)
    result.rss.idleConns = n
    result.rss.afterIdleKiB = rss2
    result.rss.perConnKiB = (rss2 - rss1) / n
    await all('disconnect', () => ({ group: 'idle' }))
    log(`RSS with ${n} more (idle) providers: ${rss1} -> ${rss2} KiB: ${fmt(result.rss.perConnKiB)} KiB per connection`)
  } else {
    result.rss.perConnKiB = result.rss.mainPerConnKiB
  }
  await sleep(500)

  // 3. fixed rate
  result.fixed = await window(o.rate, o.window, o.warmup)
  log('fixed:', line(result.fixed))

  // 4. sweep
  if (o.sweep) {
    const steps = []
    let good = null
    let bad = null
    const step = async (rate) => {
      for (let attempt = 0; ; attempt++) {
        const s = await window(rate, o.sweepWindow, o.sweepWarmup)
        s.failed = holds(s)
        s.attempt = attempt
        steps.push(s)
        log(`sweep: ${line(s)}${s.failed.length ? ` -- fails: ${s.failed.join(', ')}` : ''}`)
        if (s.failed.length && s.settled === false) throw new Error('the server did not catch up after a failing step; sweep stopped')
        await sleep(300)
        if (s.failed.length === 0) return true
        // A shared machine has hiccups: a failing step counts only once it failed --retries + 1 times.
        if (attempt >= o.retries) return false
        log('sweep: measuring that rate once more')
      }
    }
    try {
      let rate = o.sweepStart
      for (let i = 0; i < o.maxSteps; i++, rate *= 2) {
        if (await step(rate)) good = rate
        else {
          bad = rate
          break
        }
      }
      if (good === null && bad !== null) good = holds(result.fixed).length === 0 ? o.rate : null
      for (let i = 0; i < o.bisect && good !== null && bad !== null; i++) {
        const mid = Math.sqrt(good * bad)
        if (await step(mid)) good = mid
        else bad = mid
      }
    } catch (e) {
      result.errors.push(`sweep: ${e.message}`)
      log(e.message)
    }
    result.sweep = steps
    const passed = (rate) => steps.find((s) => s.rate === rate && s.failed.length === 0)
    const best = good === null ? null : passed(good) ?? (good === o.rate ? result.fixed : null)
    result.best = best ?? null
    result.firstFailing = bad === null ? null : steps.filter((s) => s.rate === bad).pop() ?? null
    if (bad === null) result.errors.push(`no step failed up to ${good}/s per provider: raise --max-steps`)
    if (best) log(`best: ${line(best)}`)
  }
} catch (e) {
  result.errors.push(e.message)
  log('error:', e.message)
  process.exitCode = 1
}

// The histograms are summarised already; drop them from the output.
const text = JSON.stringify(result, (k, v) => (k === 'hist' ? undefined : v), 1)
if (o.json) writeFileSync(o.json, text + '\n')
else console.log(text)
process.exit(process.exitCode ?? 0)
