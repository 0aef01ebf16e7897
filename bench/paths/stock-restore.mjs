// A stock restore of a saved stream: a new QEMU with the guest's command line, its disk an
// overlay on the layer frozen at the save, waiting in -incoming, then `cont`, timed from the
// launch to the guest running. Shared by the paths that restore into a new QEMU. The bench
// guest is paused meanwhile, as the saved VM is gone when one restores it for real: its vCPU
// would otherwise take one of the cores from the restore.
import { join } from 'node:path';
import { launchIncoming } from '../lib/guest.mjs';
import { cont, incomingDone, overlayOn, removeAll } from '../lib/qemu.mjs';

/**
 * `incoming` is the -incoming argument; with 'defer', `start(qmp)` sets the destination up and
 * issues migrate-incoming.
 */
export async function stockRestore({ guest, dir, tag }, { frozen, incoming, start }) {
  const runDir = join(dir, `r${tag}`);
  const disk = await overlayOn(frozen, join(dir, `r${tag}.qcow2`));
  try {
    return await guest.whilePaused(async () => {
      const started = performance.now();
      const vm = await launchIncoming(guest, { runDir, disk, incoming });
      try {
        if (start) await start(vm.qmp);
        await incomingDone(vm.qmp);
        await runAfterIncoming(vm.qmp);
        return performance.now() - started;
      } finally {
        await vm.stop();
      }
    });
  } finally {
    await removeAll(disk, runDir);
  }
}

/**
 * The destination runs by itself once loaded (no -S: autostart), but query-migrate says
 * completed a little before: the run state stays `inmigrate` until the bottom half that ends
 * the incoming migration ran, and `cont` in that moment fails ("Migration is not finalized
 * yet", QEMU 10). Waits for the state to move on, then resumes it if it is not running.
 */
async function runAfterIncoming(qmp) {
  for (;;) {
    const { status } = await qmp.execute('query-status');
    if (status === 'running') return;
    if (status !== 'inmigrate') break;
    await new Promise((r) => setTimeout(r, 1));
  }
  await cont(qmp);
  const { status } = await qmp.execute('query-status');
  if (status !== 'running') throw new Error(`the restored guest is ${status}`);
}
