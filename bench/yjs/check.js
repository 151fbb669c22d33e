#!/usr/bin/env node
// Checks that the updates the load generator encodes by hand (fleet.js, encodeInsertUpdate) are
// byte for byte what this yjs encodes for the same typing, and that a doc applying them ends
// with the same text. scripts/bench-yjs.sh runs it first; exits 1 on a difference.
import * as Y from 'yjs'
import { encodeInsertUpdate } from './fleet.js'

const doc = new Y.Doc()
const text = doc.getText('t')
let last = null
doc.on('update', (u) => { last = u })
text.insert(0, '#0|')
const replica = new Y.Doc()
Y.applyUpdate(replica, Y.encodeStateAsUpdate(doc))
let bad = 0
for (let c = 0; c < 300; c++) {
  const str = `~0.${c}|`
  const clock = Y.getState(doc.store, doc.clientID)
  text.insert(text.length, str)
  const mine = encodeInsertUpdate(doc.clientID, clock, str)
  if (Buffer.compare(Buffer.from(last), mine) !== 0) {
    if (bad++ < 3) console.error(`insert ${c}: yjs ${Buffer.from(last).toString('hex')} != ${mine.toString('hex')}`)
  }
  Y.applyUpdate(replica, mine)
}
if (replica.getText('t').toString() !== text.toString()) {
  console.error('a doc applying the hand-encoded updates differs')
  bad++
}
if (bad > 0) process.exit(1)
console.error('check: hand-encoded updates match yjs')
