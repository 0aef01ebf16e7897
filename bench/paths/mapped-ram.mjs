// QEMU >= 9.0: stop, then `migrate file:PATH` with mapped-ram + multifd (RAM at fixed offsets
// in the file, written by parallel channels), restored by `migrate-incoming file:PATH` with the
// same capabilities: what openQA (os-autoinst backend/qemu.pm) and libvirt's `save --parallel` do.
import { join } from 'node:path';
import { fileBytes } from '../lib/guest.mjs';
import { cont, freezeDisk, migrateToEnd, removeAll, withCapabilities } from '../lib/qemu.mjs';
import { stockRestore } from './stock-restore.mjs';

const CHANNELS = 2; // the machine's cores; also QEMU's default multifd-channels
const CAPS = { 'background-snapshot': false, 'mapped-ram': true, multifd: true };

export default {
  id: 'mapped-ram',
  label: 'file: + mapped-ram + multifd',
  what: "what openQA and libvirt's `--parallel` do (QEMU ≥ 9.0)",
  available: (major) => major >= 9,
  async save({ guest, dir, tag }) {
    const file = join(dir, `mapped-${tag}.bin`);
    const qmp = guest.qmp;
    const restoreCaps = await withCapabilities(qmp, CAPS);
    try {
      await qmp.execute('migrate-set-parameters', { 'multifd-channels': CHANNELS });
      await qmp.execute('stop');
      const frozen = await freezeDisk(qmp, dir, `mapped-${tag}`);
      const info = await migrateToEnd(qmp, `file:${file}`);
      await cont(qmp);
      const bytes = await fileBytes(file);
      return {
        // The file has a slot for every page (zero pages stay holes): count what QEMU sent.
        writtenBytes: info.ram.transferred,
        allocatedBytes: bytes.allocatedBytes,
        receiverCpuMs: 0, // no receiver: QEMU's multifd threads write the file (in qemuCpuMs)
        restore: { file, frozen: frozen.file },
      };
    } catch (err) {
      await removeAll(file);
      throw err;
    } finally {
      await restoreCaps();
    }
  },
  async restore(ctx, { file, frozen }) {
    const start = async (qmp) => {
      await withCapabilities(qmp, CAPS);
      await qmp.execute('migrate-set-parameters', { 'multifd-channels': CHANNELS });
      await qmp.execute('migrate-incoming', { uri: `file:${file}` });
    };
    try {
      return { 'mapped-ram': await stockRestore(ctx, { frozen, incoming: 'defer', start }) };
    } finally {
      await removeAll(file);
    }
  },
};
