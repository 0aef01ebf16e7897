// stop + migrate to a file, then a new QEMU with `-incoming "exec:cat FILE"`: what `virsh save`
// and `virsh restore` do (libvirt stops the guest, lifts the bandwidth limit and migrates to a
// file through a pipe). The bench resumes the source afterwards so the next path has a guest;
// virsh save would stop it for good.
import { join } from 'node:path';
import { fileBytes } from '../lib/guest.mjs';
import { childrenCpuMs, reapedChildrenCpuMs } from '../lib/host.mjs';
import { cont, freezeDisk, migrateToEnd, removeAll, withCapabilities } from '../lib/qemu.mjs';
import { stockRestore } from './stock-restore.mjs';

export default {
  id: 'virsh',
  label: 'stop + migrate to file, -incoming',
  what: 'what `virsh save`/`restore` do',
  available: () => true,
  async save({ guest, dir, tag }) {
    const file = join(dir, `virsh-${tag}.bin`);
    const qmp = guest.qmp;
    const restoreCaps = await withCapabilities(qmp, { 'background-snapshot': false });
    const catBefore = await childrenCpuMs(guest.pid);
    try {
      await qmp.execute('stop');
      const frozen = await freezeDisk(qmp, dir, `virsh-${tag}`); // in the pause: point in time
      await migrateToEnd(qmp, `exec:cat > ${file}`);
      const receiverCpuMs = (await reapedChildrenCpuMs(guest.pid, catBefore)) - catBefore;
      await cont(qmp);
      const bytes = await fileBytes(file);
      return {
        writtenBytes: bytes.sizeBytes,
        allocatedBytes: bytes.allocatedBytes,
        receiverCpuMs,
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
    try {
      return { virsh: await stockRestore(ctx, { frozen, incoming: `exec:cat ${file}` }) };
    } finally {
      await removeAll(file);
    }
  },
};
