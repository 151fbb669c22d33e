// A fleet of Yjs providers for the load generator (loadgen.js): every provider of a document lives
// in the same fleet (one thread), so a sender's send times are at hand where its updates arrive.
//
// Two wire protocols:
//   yws         the y-websocket protocol (y-protocols sync + awareness, one room per socket, the
//               room in the URL): docrelay's /yjs/{room} and @y/websocket-server
//   hocuspocus  Hocuspocus's: every message starts with the document name (varString), the
//               provider authenticates with a token message first, updates are acknowledged
//               with a SyncStatus message
//
// What a provider does:
//   setup       connects, sends sync step 1 and one awareness state, answers the server's step 1
//               with step 2, applies what it receives to its Y.Doc at once, and types one marker
//               `#<slot>|` through Yjs (Y.Text.insert), so that every provider's doc holds an
//               item of every other one before the measured typing starts
//   a window    types at a fixed rate: each insert is a Y.Text insert of `~<slot>.<counter>|`
//               right after the provider's own previous insert, sent as a y-protocols Update.
//               The update is encoded by hand, byte for byte what Yjs encodes for that insert
//               (one Item, origin = the provider's previous character, ContentString, empty
//               delete set), so typing costs no Y.Doc transaction. A receiver finds the stamps in
//               the update's bytes (Buffer.indexOf of `~`, then the digits), checks that each
//               counter is the next one it expects from that sender and has been sent, and
//               takes the latency from the sender's recorded send time (performance.now(), same
//               thread). It keeps the update's bytes and applies them only after the window.
//   verify      after each window every provider applies what it kept (and its own inserts) to
//               its Y.Doc in one transaction; the K docs of a room must then have the same text,
//               of the length that every insert sent adds up to (converged).
import * as Y from 'yjs'
import { WsClient, frameHeader, frameHeaderLength } from './wsclient.js'

const RING = 1 << 16 // send times kept per sender (counters in flight at once)
const MASK = RING - 1
export const BUCKET_MS = 0.01 // latency histogram: 10 us buckets
export const BUCKETS = 200000 // up to 2 s; longer ones go to the last bucket (max is kept)

const MSG_SYNC = 0
const MSG_AWARENESS = 1
const MSG_AUTH = 2
const MSG_QUERY_AWARENESS = 3
const MSG_SYNC_REPLY = 4 // hocuspocus
const MSG_SYNC_STATUS = 8 // hocuspocus
const SYNC_STEP1 = 0
const SYNC_STEP2 = 1
const SYNC_UPDATE = 2

const TILDE = 0x7e
const DOT = 0x2e
const BAR = 0x7c

// lib0-compatible variable-length unsigned integers (7 bits a byte, little end first).
function varLen (n) {
  let len = 1
  while (n > 127) {
    n = Math.floor(n / 128)
    len++
  }
  return len
}
function putVar (buf, pos, n) {
  while (n > 127) {
    buf[pos++] = 0x80 | (n & 0x7f)
    n = Math.floor(n / 128)
  }
  buf[pos++] = n
  return pos
}
function readVar (buf, pos) { // returns [value, next position]
  let n = 0
  let mult = 1
  for (;;) {
    const b = buf[pos++]
    n += (b & 0x7f) * mult
    if (b < 0x80) return [n, pos]
    mult *= 128
  }
}
function varBytes (bytes) { // varUint8Array / varString
  const out = Buffer.allocUnsafe(varLen(bytes.length) + bytes.length)
  const p = putVar(out, 0, bytes.length)
  out.set(bytes, p)
  return out
}

/**
 * The bytes of the update Yjs encodes for inserting `str` (ASCII) into a Y.Text right after the
 * character (client, clock - 1): one client, one struct, Item with origin and ContentString.
 */
export function encodeInsertUpdate (client, clock, str) {
  const out = Buffer.allocUnsafe(insertUpdateLength(client, clock, str.length))
  writeInsertUpdate(out, 0, client, clock, str)
  return out
}

function insertUpdateLength (client, clock, n) {
  return 2 + varLen(client) + varLen(clock) + 1 + varLen(client) + varLen(clock - 1) + varLen(n) + n + 1
}

/** Writes encodeInsertUpdate's bytes into out at p; returns the position after them. */
function writeInsertUpdate (out, p, client, clock, str) {
  const n = str.length
  out[p++] = 1 // clients
  out[p++] = 1 // structs of this client
  p = putVar(out, p, client)
  p = putVar(out, p, clock)
  out[p++] = 0x84 // Item: origin present, no right origin, ContentString
  p = putVar(out, p, client)
  p = putVar(out, p, clock - 1)
  p = putVar(out, p, n)
  p += out.write(str, p, 'latin1')
  out[p++] = 0 // empty delete set
  return p
}

class Provider {
  constructor (fleet, room, slot) {
    this.fleet = fleet
    this.room = room
    this.slot = slot
    this.ydoc = new Y.Doc()
    this.text = this.ydoc.getText('t')
    this.client = this.ydoc.clientID
    this.clock = 0
    this.ws = null
    this.synced = false
    this.authed = false
    this.closedWhy = null
    this.expected = new Float64Array(room.k) // next counter expected from each sender slot
    // Updates received in the window, applied after it: their bytes one after the other in
    // `kept` (one buffer, grown by doubling; no object per update for the GC), ends in `keptEnds`.
    this.kept = null
    this.keptLen = 0
    this.keptEnds = []
    this.sent = 0 // stamped updates sent so far
    this.sendTs = new Float64Array(RING)
    this.mFrom = Infinity // counters in [mFrom, mTo) were sent in the measured part of the window
    this.mTo = Infinity
    this.winCounter0 = 0 // counter and clock at the start of the current window
    this.winClock0 = 0
    this.ydoc.on('update', (update, origin) => {
      if (origin !== 'remote') this.sendSync(SYNC_UPDATE, update)
    })
  }

  connect () {
    const f = this.fleet
    const path = f.protocol === 'hocuspocus' ? f.path : `${f.path}/${this.room.name}?token=${f.token}`
    this.ws = new WsClient({ host: f.host, port: f.port, path }, {
      onOpen: () => this.onOpen(),
      onMessage: (m) => this.onMessage(m),
      onClose: (code, why) => this.onClose(code, why),
    })
    this.ws.connect()
  }

  onOpen () {
    if (this.fleet.protocol === 'hocuspocus') {
      // Auth message: [doc][Auth][Token][token]
      this.send(Buffer.concat([Buffer.from([MSG_AUTH, 0]), varBytes(Buffer.from(this.fleet.token))]))
    } else {
      this.start()
    }
  }

  start () { // what a WebsocketProvider does once open: sync step 1, then its awareness state
    this.sendSync(SYNC_STEP1, Y.encodeStateVector(this.ydoc))
    const state = Buffer.from(JSON.stringify({ user: { name: `bench ${this.room.name}/${this.slot}` } }))
    const upd = Buffer.allocUnsafe(1 + varLen(this.client) + 1 + varLen(state.length) + state.length)
    let p = 0
    upd[p++] = 1 // one client
    p = putVar(upd, p, this.client)
    upd[p++] = 1 // its clock
    p = putVar(upd, p, state.length)
    upd.set(state, p)
    this.send(Buffer.concat([Buffer.from([MSG_AWARENESS]), varBytes(upd)]))
  }

  send (body) { // body: one message without the hocuspocus document prefix
    if (this.ws === null) return
    this.ws.send(this.room.prefix === null ? body : Buffer.concat([this.room.prefix, body]))
  }

  sendSync (step, data) {
    this.send(Buffer.concat([Buffer.from([MSG_SYNC, step]), varBytes(data)]))
  }

  /**
   * One typed insert, stamped; `now` is the send time. The whole WebSocket frame (header,
   * [hocuspocus: document name], Sync, Update, the update) is written into one buffer.
   */
  type (now) {
    const c = this.sent
    const str = `~${this.slot}.${c}|`
    const ulen = insertUpdateLength(this.client, this.clock, str.length)
    const prefix = this.room.prefix
    const plen = (prefix === null ? 0 : prefix.length) + 2 + varLen(ulen) + ulen
    const out = Buffer.allocUnsafe(frameHeaderLength(plen) + plen)
    let p = frameHeader(out, plen)
    if (prefix !== null) p += prefix.copy(out, p)
    out[p++] = MSG_SYNC
    out[p++] = SYNC_UPDATE
    p = putVar(out, p, ulen)
    writeInsertUpdate(out, p, this.client, this.clock, str)
    this.clock += str.length
    this.room.totalLen += str.length
    this.sendTs[c & MASK] = now
    this.sent = c + 1
    this.ws.sendFrame(out)
  }

  onMessage (m) {
    const f = this.fleet
    f.messages++
    let pos = 0
    if (this.room.prefix !== null) { // hocuspocus: skip the document name
      const [n, next] = readVar(m, 0)
      pos = next + n
    }
    const type = m[pos++]
    switch (type) {
      case MSG_SYNC:
      case MSG_SYNC_REPLY: {
        const step = m[pos++]
        const [n, next] = readVar(m, pos)
        const data = m.subarray(next, next + n)
        if (step === SYNC_STEP1) {
          this.sendSync(SYNC_STEP2, Y.encodeStateAsUpdate(this.ydoc, data))
        } else if (step === SYNC_STEP2 || step === SYNC_UPDATE) {
          if (f.live) {
            Y.applyUpdate(this.ydoc, data, 'remote')
          } else {
            this.received(data)
          }
          if (step === SYNC_STEP2) this.synced = true
        } else {
          f.errors.push(`${this.room.name}/${this.slot}: unknown sync step ${step}`)
        }
        return
      }
      case MSG_AWARENESS:
        f.awareness++
        return
      case MSG_AUTH: {
        const sub = m[pos++]
        if (this.room.prefix !== null && sub === 2) { // hocuspocus: Authenticated
          this.authed = true
          this.start()
          return
        }
        const [n, next] = readVar(m, pos)
        f.errors.push(`${this.room.name}/${this.slot}: auth message ${sub}: ${m.subarray(next, next + n).toString()}`)
        return
      }
      case MSG_SYNC_STATUS:
        f.syncStatus++
        return
      case MSG_QUERY_AWARENESS:
        return
      default:
        f.errors.push(`${this.room.name}/${this.slot}: unknown message type ${type}`)
    }
  }

  /** An update in a window: count and time its stamps, keep it for verify. */
  received (data) {
    const f = this.fleet
    const room = this.room
    const k = room.k
    const n = data.length
    let foreign = false
    let stamps = 0
    let now = -1
    let i = data.indexOf(TILDE)
    while (i >= 0) {
      let j = i + 1
      let slot = 0
      while (j < n && data[j] >= 48 && data[j] <= 57) slot = slot * 10 + data[j++] - 48
      let ok = false
      let c = 0
      if (j > i + 1 && j < n && data[j] === DOT) {
        const s = ++j
        while (j < n && data[j] >= 48 && data[j] <= 57) c = c * 10 + data[j++] - 48
        ok = j > s && j < n && data[j] === BAR
      }
      if (ok && slot < k) {
        stamps++
        if (slot === this.slot) {
          f.echoes++
        } else {
          const sender = room.providers[slot]
          if (c < sender.sent) {
            const e = this.expected[slot]
            if (c >= e) {
              if (c > e) f.gaps += c - e
              this.expected[slot] = c + 1
              foreign = true
              f.delivered++
              if (c >= sender.mFrom && c < sender.mTo) {
                if (now < 0) now = performance.now()
                const lat = now - sender.sendTs[c & MASK]
                let b = Math.floor(lat / BUCKET_MS)
                if (b >= BUCKETS) b = BUCKETS - 1
                f.hist[b]++
                if (lat > f.maxLat) f.maxLat = lat
                f.measured++
              }
            } else {
              f.dups++
            }
          } else {
            f.bogus++
          }
        }
        i = data.indexOf(TILDE, j + 1)
      } else {
        i = data.indexOf(TILDE, i + 1)
      }
    }
    if (foreign || stamps === 0) this.keep(data)
  }

  keep (data) { // data is a view of the read buffer: copy it
    const need = this.keptLen + data.length
    if (this.kept === null || need > this.kept.length) {
      const grown = Buffer.allocUnsafe(Math.max(4096, need, this.kept === null ? 0 : 2 * this.kept.length))
      if (this.kept !== null) this.kept.copy(grown, 0, 0, this.keptLen)
      this.kept = grown
    }
    data.copy(this.kept, this.keptLen)
    this.keptLen = need
    this.keptEnds.push(need)
  }

  onClose (code, why) {
    this.closedWhy = `${code} ${why}`
    if (!this.fleet.closing) this.fleet.errors.push(`${this.room.name}/${this.slot}: closed ${code} ${why}`)
  }

  /** Applies the window's updates (its own as one merged insert), in one transaction. */
  applyKept () {
    const parts = []
    for (let c = this.winCounter0; c < this.sent; c++) parts.push(`~${this.slot}.${c}|`)
    Y.transact(this.ydoc, () => {
      if (parts.length > 0) Y.applyUpdate(this.ydoc, encodeInsertUpdate(this.client, this.winClock0, parts.join('')), 'remote')
      let start = 0
      for (const end of this.keptEnds) {
        Y.applyUpdate(this.ydoc, this.kept.subarray(start, end), 'remote')
        start = end
      }
    }, 'remote')
    this.keptLen = 0
    this.keptEnds = []
    if (this.kept !== null && this.kept.length > 4 << 20) this.kept = null // give a big one back
    this.winCounter0 = this.sent
    this.winClock0 = this.clock
  }
}

export class Fleet {
  /**
   * @param {{protocol: 'yws'|'hocuspocus', host: string, port: number, path: string, token: string}} opts
   */
  constructor (opts) {
    this.protocol = opts.protocol
    this.host = opts.host
    this.port = opts.port
    this.path = opts.path
    this.token = opts.token
    this.groups = new Map() // name -> rooms
    this.live = true
    this.closing = false
    this.resetCounters()
  }

  resetCounters () {
    this.messages = 0
    this.awareness = 0
    this.syncStatus = 0
    this.echoes = 0
    this.delivered = 0
    this.measured = 0
    this.gaps = 0
    this.dups = 0
    this.bogus = 0
    this.errors = []
    this.hist = new Uint32Array(BUCKETS)
    this.maxLat = 0
  }

  /** Connects k providers to each named room, syncs them and types the markers. */
  async connect ({ group, rooms, k, timeoutMs = 30000 }) {
    const t0 = performance.now()
    this.live = true
    const list = []
    for (const name of rooms) {
      const room = {
        name,
        k,
        providers: [],
        totalLen: 0,
        prefix: this.protocol === 'hocuspocus' ? varBytes(Buffer.from(name)) : null,
      }
      for (let s = 0; s < k; s++) room.providers.push(new Provider(this, room, s))
      list.push(room)
    }
    this.groups.set(group, list)
    const all = list.flatMap((r) => r.providers)
    // Connect in batches, so that a server's accept queue is not overrun.
    for (let i = 0; i < all.length; i += 50) {
      for (const p of all.slice(i, i + 50)) p.connect()
      await waitFor(() => all.slice(i, i + 50).every((p) => p.synced || p.closedWhy !== null), timeoutMs)
    }
    const failed = all.filter((p) => !p.synced)
    if (failed.length > 0) throw new Error(`${failed.length} providers did not sync: ${failed[0].closedWhy ?? 'timeout'}; ${this.errors.slice(0, 3).join('; ')}`)
    for (const room of list) {
      for (const p of room.providers) {
        const marker = `#${p.slot}|`
        room.totalLen += marker.length
        p.text.insert(p.text.length, marker)
        p.clock = Y.getState(p.ydoc.store, p.client)
        p.winClock0 = p.clock
      }
    }
    await waitFor(() => list.every((r) => r.providers.every((p) => p.text.length === r.totalLen)), timeoutMs)
    const behind = all.filter((p) => p.text.length !== p.room.totalLen)
    if (behind.length > 0) throw new Error(`${behind.length} providers did not receive every marker`)
    // From now on the provider types without Yjs and applies its own inserts as remote updates
    // (verify); a Y.Doc that sees its own client id in a remote update takes a new one and says
    // so. Give it an unused id now: nothing it types from here on goes through the Y.Doc.
    for (const p of all) p.ydoc.clientID = (p.client ^ 0x5a5a5a5a) >>> 0
    this.live = false
    return { providers: all.length, ms: performance.now() - t0, errors: this.errors.splice(0) }
  }

  async disconnect ({ group }) {
    const list = this.groups.get(group) ?? []
    this.closing = true
    for (const room of list) for (const p of room.providers) p.ws.close()
    await waitFor(() => list.every((r) => r.providers.every((p) => p.closedWhy !== null)), 5000)
    this.closing = false
    this.groups.delete(group)
    return { closed: list.length }
  }

  /**
   * Types in the rooms of `group` at `rate` inserts/s per provider, from tStart to tEnd (epoch ms,
   * performance.timeOrigin + performance.now()); inserts sent from tMeasure on are measured. Then
   * waits until every insert has reached the k - 1 other providers of its room, or drainMs passed.
   */
  async window ({ group, rate, tStart, tMeasure, tEnd, drainMs }) {
    const list = this.groups.get(group)
    const k = list[0].k
    // Senders in slot-major order, so that consecutive sends go to different rooms.
    const order = []
    for (let s = 0; s < k; s++) for (const room of list) order.push(room.providers[s])
    const S = order.length
    const origin = performance.timeOrigin
    const start = tStart - origin
    const measure = tMeasure - origin
    const end = tEnd - origin
    const gap = 1000 / (rate * S) // ms between two sends of the whole fleet
    this.resetCounters()
    for (const p of order) {
      p.mFrom = Infinity
      p.mTo = Infinity
    }
    const sent0 = order.map((p) => p.sent)
    let j = 0
    let mSent = 0
    let lateMax = 0
    await new Promise((resolve) => {
      const tick = () => {
        const now = performance.now()
        for (;;) {
          const at = start + j * gap
          if (at > now) break
          if (at >= end) {
            clearInterval(timer)
            return resolve()
          }
          const p = order[j % S]
          if (at >= measure) {
            if (p.mFrom === Infinity) p.mFrom = p.sent
            mSent++
            if (now - at > lateMax) lateMax = now - at
          }
          p.type(now)
          j++
        }
      }
      const timer = setInterval(tick, 1)
      tick()
    })
    for (const p of order) {
      if (p.mFrom === Infinity) p.mFrom = p.sent
      p.mTo = p.sent
    }
    let sent = 0
    order.forEach((p, i) => { sent += p.sent - sent0[i] })
    const expected = sent * (k - 1)
    const t0 = performance.now()
    await waitFor(() => this.delivered >= expected, drainMs)
    const drain = performance.now() - t0
    let mExpected = 0
    for (const p of order) mExpected += (p.mTo - p.mFrom) * (k - 1)
    return {
      sent,
      measuredSent: mSent,
      expected,
      delivered: this.delivered,
      measuredExpected: mExpected,
      measured: this.measured,
      lateMaxMs: lateMax,
      drainMs: drain,
      echoes: this.echoes,
      syncStatus: this.syncStatus,
      gaps: this.gaps,
      dups: this.dups,
      bogus: this.bogus,
      messages: this.messages,
      maxLat: this.maxLat,
      hist: this.hist,
      errors: this.errors.splice(0),
    }
  }

  /** Waits until the deliveries of the last window are in (after a window whose drain ran out). */
  async settle ({ group, timeoutMs }) {
    const list = this.groups.get(group)
    const k = list[0].k
    const all = list.flatMap((r) => r.providers)
    const done = () => all.every((p) => {
      for (let s = 0; s < k; s++) if (s !== p.slot && p.expected[s] < p.room.providers[s].sent) return false
      return true
    })
    await waitFor(done, timeoutMs)
    return { settled: done(), delivered: this.delivered }
  }

  /** Applies what every provider kept and compares the k docs of each room. */
  async verify ({ group }) {
    const t0 = performance.now()
    const list = this.groups.get(group)
    let mismatched = 0
    let short = 0
    const examples = []
    for (const room of list) {
      for (const p of room.providers) p.applyKept()
      const first = room.providers[0].text.toString()
      for (const p of room.providers) {
        const s = p === room.providers[0] ? first : p.text.toString()
        if (s.length !== room.totalLen) short++
        if (s !== first) {
          mismatched++
          if (examples.length < 3) examples.push(`${room.name}/${p.slot}: length ${s.length}, provider 0 has ${first.length}, sent ${room.totalLen}`)
        }
      }
    }
    const chars = list.reduce((a, r) => a + r.totalLen, 0)
    return { rooms: list.length, chars, mismatched, short, examples, ms: performance.now() - t0 }
  }
}

export function waitFor (cond, timeoutMs) {
  return new Promise((resolve) => {
    const t0 = performance.now()
    const check = () => {
      if (cond() || performance.now() - t0 > timeoutMs) return resolve()
      setTimeout(check, 5)
    }
    check()
  })
}
