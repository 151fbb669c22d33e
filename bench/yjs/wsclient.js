// A minimal WebSocket client (RFC 6455) over node:net, for the load generator only.
//
// It is much cheaper per message than the `ws` package, which matters here: the generator runs
// hundreds of providers on one core and must cost less than the servers it measures.
// - Frames it sends are binary, unfragmented and written with one socket write each; they are
//   masked, as a client's frames must be, with the masking key 0 (the payload is unchanged, so
//   no XOR pass; a server unmasks it exactly as it would any other key).
// - Frames it receives: binary and text, fragmented or not, ping (answered with pong), pong
//   (ignored) and close (answered, then the socket ends).
// - Reads go through net's `onread` option into one buffer shared by every socket of the thread,
//   without a stream, a 'data' event or a new buffer per read. A payload handed to onMessage is
//   a view of that buffer: valid only until onMessage returns, so copy what you keep.
import net from 'node:net'
import crypto from 'node:crypto'

const READ_BUFFER = Buffer.allocUnsafe(256 * 1024)

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'

export class WsClient {
  /**
   * @param {{host: string, port: number, path: string}} target
   * @param {{onOpen?: () => void, onMessage: (data: Buffer) => void, onClose?: (code: number, why: string) => void}} handlers
   */
  constructor (target, handlers) {
    this.target = target
    this.handlers = handlers
    this.socket = null
    this.open = false
    this.closed = false
    this.head = null // bytes of the HTTP response head so far
    this.rest = null // bytes of an incomplete frame
    this.fragments = null // payloads of a fragmented message so far
    this.key = crypto.randomBytes(16).toString('base64')
  }

  connect () {
    const { host, port, path } = this.target
    const s = net.connect({
      host,
      port,
      onread: {
        buffer: READ_BUFFER,
        callback: (n, buf) => {
          const chunk = buf.subarray(0, n)
          if (this.open) this.frames(chunk)
          else this.handshake(chunk)
        },
      },
    })
    this.socket = s
    s.setNoDelay(true)
    s.on('connect', () => {
      s.write(`GET ${path} HTTP/1.1\r\nHost: ${host}:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: ${this.key}\r\nSec-WebSocket-Version: 13\r\n\r\n`)
    })
    s.on('error', (e) => this.gone(1006, e.message))
    s.on('close', () => this.gone(1006, 'socket closed'))
  }

  handshake (chunk) {
    const buf = this.head === null ? chunk : Buffer.concat([this.head, chunk])
    const end = buf.indexOf('\r\n\r\n')
    if (end < 0) {
      this.head = Buffer.from(buf)
      if (buf.length > 16384) this.fail('response head too long')
      return
    }
    this.head = null
    const text = buf.subarray(0, end).toString('latin1')
    const status = text.slice(0, text.indexOf('\r\n'))
    if (!/^HTTP\/1\.1 101/.test(status)) return this.fail(`handshake refused: ${status}`)
    const accept = /\r\nsec-websocket-accept:\s*(\S+)/i.exec(text)
    const want = crypto.createHash('sha1').update(this.key + GUID).digest('base64')
    if (accept === null || accept[1] !== want) return this.fail('bad Sec-WebSocket-Accept')
    this.open = true
    if (this.handlers.onOpen) this.handlers.onOpen()
    if (buf.length > end + 4) this.frames(buf.subarray(end + 4))
  }

  frames (chunk) {
    let buf = chunk
    if (this.rest !== null) {
      buf = Buffer.concat([this.rest, chunk])
      this.rest = null
    }
    const len = buf.length
    let off = 0
    while (len - off >= 2) {
      const b0 = buf[off]
      const b1 = buf[off + 1]
      let plen = b1 & 0x7f
      let hdr = 2
      if (plen === 126) {
        if (len - off < 4) break
        plen = buf.readUInt16BE(off + 2)
        hdr = 4
      } else if (plen === 127) {
        if (len - off < 10) break
        plen = buf.readUInt32BE(off + 2) * 4294967296 + buf.readUInt32BE(off + 6)
        hdr = 10
      }
      const masked = (b1 & 0x80) !== 0
      if (masked) hdr += 4
      if (len - off < hdr + plen) break
      let payload = buf.subarray(off + hdr, off + hdr + plen)
      if (masked) { // a server must not mask; unmask anyway rather than misread
        payload = Buffer.from(payload)
        for (let i = 0; i < plen; i++) payload[i] ^= buf[off + hdr - 4 + (i & 3)]
      }
      off += hdr + plen
      this.frame(b0 & 0x0f, (b0 & 0x80) !== 0, payload)
      if (this.closed) return
    }
    if (off < len) this.rest = Buffer.from(buf.subarray(off)) // buf is reused by the next read
  }

  frame (opcode, fin, payload) {
    switch (opcode) {
      case 0x0: // continuation
        if (this.fragments === null) return this.fail('continuation without a start')
        this.fragments.push(Buffer.from(payload))
        if (fin) {
          const whole = Buffer.concat(this.fragments)
          this.fragments = null
          this.handlers.onMessage(whole)
        }
        return
      case 0x1:
      case 0x2:
        if (fin) this.handlers.onMessage(payload)
        else this.fragments = [Buffer.from(payload)]
        return
      case 0x8: {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005
        const why = payload.length > 2 ? payload.subarray(2).toString('utf8') : ''
        if (!this.closed) this.socket.write(frameOf(0x8, payload.subarray(0, 2)))
        this.socket.end()
        return this.gone(code, why)
      }
      case 0x9:
        this.socket.write(frameOf(0xa, payload))
        return
      case 0xa:
        return
      default:
        this.fail(`unknown opcode ${opcode}`)
    }
  }

  /** Sends one binary message. */
  send (payload) {
    if (!this.open || this.closed) return false
    this.socket.write(frameOf(0x2, payload))
    return true
  }

  /** Sends a frame built by the caller (see frameHeader): one socket write, no copy. */
  sendFrame (frame) {
    if (!this.open || this.closed) return false
    this.socket.write(frame)
    return true
  }

  /** Closes with 1000 (the server answers, then the socket ends). */
  close () {
    if (!this.open || this.closed) {
      if (this.socket) this.socket.destroy()
      return this.gone(1000, 'closed by client')
    }
    const body = Buffer.alloc(2)
    body.writeUInt16BE(1000, 0)
    this.socket.write(frameOf(0x8, body))
    setTimeout(() => this.socket.destroy(), 1000).unref()
  }

  fail (why) {
    if (this.socket) this.socket.destroy()
    this.gone(1002, why)
  }

  gone (code, why) {
    if (this.closed) return
    this.closed = true
    this.open = false
    if (this.handlers.onClose) this.handlers.onClose(code, why)
  }
}

/** Bytes of the header of a client frame (mask key included) with an n-byte payload. */
export function frameHeaderLength (n) {
  return n < 126 ? 6 : n < 65536 ? 8 : 14
}

/**
 * Writes, at the start of `out`, the header of a final binary frame (masking key 0) whose n-byte
 * payload follows it; returns the header's length.
 */
export function frameHeader (out, n) {
  return writeHeader(out, 0x2, n)
}

/** One masked (key 0) frame with the given opcode and payload. */
export function frameOf (opcode, payload) {
  const n = payload.length
  const out = Buffer.allocUnsafe(frameHeaderLength(n) + n)
  const hdr = writeHeader(out, opcode, n)
  if (n > 0) out.set(payload, hdr)
  return out
}

function writeHeader (out, opcode, n) {
  const hdr = frameHeaderLength(n)
  out[0] = 0x80 | opcode
  if (n < 126) {
    out[1] = 0x80 | n
  } else if (n < 65536) {
    out[1] = 0x80 | 126
    out.writeUInt16BE(n, 2)
  } else {
    out[1] = 0x80 | 127
    out.writeUInt32BE(Math.floor(n / 4294967296), 2)
    out.writeUInt32BE(n >>> 0, 6)
  }
  out.writeUInt32LE(0, hdr - 4) // the masking key: 0
  return hdr
}
