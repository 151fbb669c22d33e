// One generator thread (loadgen.js --workers W > 1): a Fleet that runs the commands posted to it.
import { parentPort, workerData } from 'node:worker_threads'
import { Fleet } from './fleet.js'

const fleet = new Fleet(workerData)
const CMDS = new Set(['connect', 'disconnect', 'window', 'settle', 'verify'])
parentPort.on('message', async ({ id, cmd, args }) => {
  try {
    if (!CMDS.has(cmd)) throw new Error(`unknown command ${cmd}`)
    const result = await fleet[cmd](args)
    parentPort.postMessage({ id, ok: true, result }, result && result.hist ? [result.hist.buffer] : [])
  } catch (e) {
    parentPort.postMessage({ id, ok: false, error: e.message })
  }
})
