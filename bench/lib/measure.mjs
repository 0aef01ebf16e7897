// One save measured the same way for every path: QEMU's STOP→RESUME, the guest's heartbeat
// delay, the time, the CPU of QEMU and of the receiver, and the workload's memory throughput
// while it ran (relative to the idle rate of the same run).
import { processCpuMs } from './host.mjs';
import { recordEvents } from './qemu.mjs';

const MiB = 2 ** 20;

/** Memory throughput of the undisturbed workload over `ms` (MiB/s). */
export async function idleRateMibps(guest, ms) {
  const a = await guest.progress();
  await new Promise((r) => setTimeout(r, ms));
  const b = await guest.progress();
  return rateMibps(a, b);
}

function rateMibps(a, b) {
  return ((b.pages - a.pages) * 4096) / MiB / ((b.atMs - a.atMs) / 1000);
}

/**
 * Runs `save()` (which returns the path's own figures: totalMs when it times itself, bytes,
 * receiverCpuMs) inside one measurement window and adds what is measured from outside.
 */
export async function measureSave(guest, idleMibps, save) {
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
      throughputPct: (rateMibps(before, after) / idleMibps) * 100,
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
