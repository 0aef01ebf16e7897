// One save measured the same way for every path: QEMU's STOP→RESUME, the guest's heartbeat
// delay, the time, the CPU of QEMU and of the receiver, and the workload's memory throughput
// while it ran relative to its rate just before (the host is shared: the rate moves with its
// load, so the idle reference is taken right next to each measurement).
import { processCpuMs } from './host.mjs';
import { recordEvents } from './qemu.mjs';

const MiB = 2 ** 20;

function rateMibps(a, b) {
  return ((b.pages - a.pages) * 4096) / MiB / ((b.atMs - a.atMs) / 1000);
}

/**
 * Runs `save()` (which returns the path's own figures: bytes, receiverCpuMs, totalMs when it
 * times a command more closely than the window, and what its restore needs) inside one measurement window, after `idleMs` of the undisturbed workload,
 * and adds what is measured from outside. Returns once a heartbeat after the window arrived,
 * so the heartbeat gap around it is known before anything else (a loadvm) runs.
 */
export async function measureSave(guest, idleMs, save) {
  const idleStartMs = performance.now();
  const idleFrom = await guest.progress();
  await new Promise((r) => setTimeout(r, idleMs));
  // A heartbeat inside the idle window, so the gap measured around the save starts after
  // whatever paused the guest before it (a restore of the previous path).
  await guest.heartbeatAfter(idleStartMs);
  const before = await guest.progress();
  const events = recordEvents(guest.qmp);
  const qemuCpuBefore = await processCpuMs(guest.pid);
  const startMs = performance.now();
  let own;
  try {
    own = await save();
  } finally {
    events.stop();
  }
  const endMs = performance.now();
  const qemuCpuMs = (await processCpuMs(guest.pid)) - qemuCpuBefore;
  await guest.ensureRunning();
  const after = await guest.progress();
  await guest.heartbeatAfter(endMs);
  const { restore, ...figures } = own;
  return {
    figures: {
      pauseMs: events.pauseMs(),
      heartbeatDelayMs: guest.heartbeatDelayMs(startMs, endMs),
      totalMs: endMs - startMs,
      qemuCpuMs,
      idleMibps: rateMibps(idleFrom, before),
      throughputPct: (rateMibps(before, after) / rateMibps(idleFrom, before)) * 100,
      ...figures,
    },
    restore,
  };
}

/** Times `fn` (ms). */
export async function timed(fn) {
  const started = performance.now();
  await fn();
  return performance.now() - started;
}
