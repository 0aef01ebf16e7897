// HMP `savevm` / `loadvm`: QEMU's internal qcow2 snapshot. The guest is stopped for the whole
// save; the VM state goes into the disk's top qcow2 image beside the disk's internal snapshot.
import { fileBytes } from '../lib/guest.mjs';
import { topDisk } from '../lib/qemu.mjs';

/** HMP answers a failed command with text, not a QMP error (hmp_savevm prints and returns). */
async function hmp(guest, command) {
  const out = await guest.machine.hmp(command);
  if (out.trim()) throw new Error(`HMP ${command}: ${out.trim()}`);
}

export default {
  id: 'savevm',
  label: 'HMP savevm / loadvm',
  what: "QEMU's internal qcow2 snapshot, guest stopped throughout",
  available: () => true,
  async prepare({ guest }) {
    const top = await topDisk(guest.qmp);
    return { top, before: await fileBytes(top.file) };
  },
  async save({ guest, tag }, { top, before }) {
    const started = performance.now();
    await hmp(guest, `savevm bench-${tag}`);
    const totalMs = performance.now() - started; // the command alone, not the queries below
    const after = await fileBytes(top.file);
    const blocks = await guest.qmp.execute('query-block');
    const snap = blocks
      .flatMap((b) => b.inserted?.image?.snapshots ?? [])
      .find((s) => s.name === `bench-${tag}`);
    return {
      totalMs,
      writtenBytes: snap['vm-state-size'],
      allocatedBytes: after.allocatedBytes - before.allocatedBytes,
      receiverCpuMs: 0, // no receiver: QEMU writes the qcow2 itself (its CPU is in qemuCpuMs)
      restore: { name: `bench-${tag}` },
    };
  },
  async restore({ guest }, { name }) {
    const started = performance.now();
    await hmp(guest, `loadvm ${name}`); // reverts this guest in place; it runs on when it ran before
    await guest.ensureRunning();
    const restoreMs = performance.now() - started;
    await hmp(guest, `delvm ${name}`);
    return { savevm: restoreMs };
  },
};
