// QEMU's background snapshot to `exec:cat > FILE`: the primitive qsnap builds on. The guest
// runs while RAM streams (write-protected, old pages sent first). QEMU alone has no way to
// freeze the disk in its pause, so the layer its restore opens is frozen just before
// `migrate`, with the guest running: a few milliseconds older than the RAM (timing only).
import { join } from 'node:path';
import { fileBytes } from '../lib/guest.mjs';
import { childrenCpuMs, reapedChildrenCpuMs } from '../lib/host.mjs';
import { freezeDisk, migrateToEnd, removeAll, withCapabilities } from '../lib/qemu.mjs';
import { stockRestore } from './stock-restore.mjs';

export default {
  id: 'bgsnap',
  label: 'background snapshot → exec:cat file',
  what: 'the primitive qsnap builds on',
  available: () => true,
  async prepare({ guest, dir, tag }) {
    return { frozen: (await freezeDisk(guest.qmp, dir, `bg-${tag}`)).file };
  },
  async save({ guest, dir, tag }, { frozen }) {
    const file = join(dir, `bg-${tag}.bin`);
    const qmp = guest.qmp;
    const restoreCaps = await withCapabilities(qmp, { 'background-snapshot': true });
    const catBefore = await childrenCpuMs(guest.pid);
    try {
      await migrateToEnd(qmp, `exec:cat > ${file}`);
      const receiverCpuMs = (await reapedChildrenCpuMs(guest.pid, catBefore)) - catBefore;
      const bytes = await fileBytes(file);
      return {
        writtenBytes: bytes.sizeBytes,
        allocatedBytes: bytes.allocatedBytes,
        receiverCpuMs,
        restore: { file, frozen },
      };
    } catch (err) {
      await removeAll(file);
      throw err;
    } finally {
      await restoreCaps();
    }
  },
  async restore(ctx, { file, frozen }) {
    try {
      return { bgsnap: await stockRestore(ctx, { frozen, incoming: `exec:cat ${file}` }) };
    } finally {
      await removeAll(file);
    }
  },
};
