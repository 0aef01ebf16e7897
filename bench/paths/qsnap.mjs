// qsnap: snapshot() from dist/ through the guest's public QMP socket, as a user would, then
// the workload's invariant check (by the runner); the file restored fully (QEMU >= 9.0 reads it
// itself with mapped-ram while qsnap checks its pages; 7.2 gets the stream rebuilt, pages checked)
// and lazily (RAM mapped from the file), each into a new QEMU beside the running guest.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { restore, snapshot } from '../../dist/index.js';
import { removeAll } from '../lib/qemu.mjs';

/** Bytes this process handed to write(2)/pwrite(2) so far, all threads (`wchar` of /proc/self/io). */
async function writtenByThisProcess() {
  return Number((await readFile('/proc/self/io', 'utf8')).match(/^wchar: (\d+)/m)[1]);
}

async function timeRestore({ guest, dir, tag }, file, lazy) {
  const runDir = join(dir, `r${tag}-${lazy ? 'l' : 'f'}`);
  // Paused meanwhile like for a stock restore (stock-restore.mjs).
  return guest.whilePaused(async () => {
    const started = performance.now();
    const result = await restore({
      file,
      argv: guest.commandLine.argv,
      lazy,
      attached: true,
      relocateSockets: true,
      runDir,
    }).result;
    const restoreMs = performance.now() - started;
    if (process.env.QSNAP_BENCH_DEBUG)
      console.error(
        'restore',
        lazy ? 'lazy' : 'full',
        result.loadPath,
        Math.round(restoreMs),
        Math.round(result.loadMs),
      );
    await result.vm.stop();
    await removeAll(runDir, ...result.disks.map((d) => d.overlayFile));
    return restoreMs;
  });
}

/**
 * The qsnap save path over `transport` ('pipe', the default for a local QEMU, or 'unix'); the
 * pipe's file is also restored (full and lazy), the socket's only saved: it measures the transport.
 */
function qsnapPath({ id, label, transport, restores }) {
  return {
    id,
    label,
    what: 'ours',
    available: () => true,
    /** The runner checks the workload's invariant after the measurement: the guest was not harmed. */
    checkAfter: true,
    async save({ guest, dir, tag }) {
      const file = join(dir, `${id}-${tag}.qsnap`);
      const cpuBefore = process.cpuUsage();
      const writtenBefore = await writtenByThisProcess();
      const r = await snapshot({
        qmp: guest.machine.qmpPath,
        out: file,
        commandLine: guest.commandLine.argv,
        transport,
      }).result;
      if (r.transport !== transport) throw new Error(`qsnap streamed over ${r.transport}, not ${transport}`);
      const cpu = process.cpuUsage(cpuBefore);
      return {
        writtenBytes: (await writtenByThisProcess()) - writtenBefore,
        allocatedBytes: r.allocatedBytes,
        // Every thread of this process (parser, writer pool, GC) while snapshot() ran.
        receiverCpuMs: (cpu.user + cpu.system) / 1000,
        restore: { file },
      };
    },
    async restore(ctx, { file }) {
      try {
        if (!restores) return {};
        return {
          qsnap: await timeRestore(ctx, file, false),
          'qsnap-lazy': await timeRestore(ctx, file, true),
        };
      } finally {
        await removeAll(file);
      }
    },
  };
}

export default qsnapPath({
  id: 'qsnap',
  label: 'qsnap snapshot, full restore',
  transport: 'pipe',
  restores: true,
});

export const qsnapUnix = qsnapPath({
  id: 'qsnap-unix',
  label: 'qsnap snapshot over a unix socket',
  transport: 'unix',
  restores: false,
});
