import { resolve } from 'node:path';
import { restore } from '../../engine/restore/restore.js';
import { sweepStaleRunDirs } from '../../vm/run-dir.js';
import { parseCommand, singleFile, UsageError } from '../args.js';
import { formatMs, makeOutput } from '../output.js';
import { ProgressBar } from '../progress.js';

const spec = {
  name: 'restore',
  summary:
    'Start a new QEMU from the command line the VM was started with and load the snapshot into it.\n' +
    'Each snapshotted disk gets a fresh qcow2 overlay backed by the frozen layer (never written), so\n' +
    'one snapshot restores any number of times. QEMU keeps running after qsnap exits.\n' +
    '--lazy maps guest RAM straight from the snapshot file (private mapping): restore time does\n' +
    'not grow with RAM size; refused with virtio-balloon or virtio-mem devices on QEMU < 8.2.',
  usage: 'qsnap restore <file> [--lazy] [--paused] [--qmp <socket>] [--json] -- <qemu command line>',
  options: {
    lazy: { type: 'boolean' },
    paused: { type: 'boolean' },
    qmp: { type: 'string' },
    'overlay-dir': { type: 'string' },
    'run-dir': { type: 'string' },
    'verify-all': { type: 'boolean' },
    json: { type: 'boolean' },
  },
  help: {
    lazy: 'map RAM from the snapshot file instead of loading it',
    paused: 'leave the guest paused after loading',
    qmp: 'QMP socket to add if the command line has none (default: <run-dir>/qmp.sock)',
    'overlay-dir': 'where the restore overlays go (default: beside each frozen disk layer)',
    'run-dir': "directory for QEMU's log (default: a new temp directory)",
    'verify-all':
      'verify every checksum of the file before loading (lazy mode does not read mapped RAM otherwise)',
    json: 'print one JSON object (restoreMs, pid, qmp, mode, disks…)',
  },
  allowPositionals: true,
  examples: [
    'qsnap restore vm.qsnap -- qemu-system-x86_64 -m 2G -drive file=disk.qcow2,if=virtio -qmp unix:vm.sock,server=on,wait=off',
    'qsnap restore vm.qsnap --lazy --json -- $(cat vm.cmdline)',
  ],
} as const;

export async function restoreCommand(argv: string[]): Promise<number> {
  const dash = argv.indexOf('--');
  const own = dash >= 0 ? argv.slice(0, dash) : argv;
  const qemuArgv = dash >= 0 ? argv.slice(dash + 1) : [];
  const parsed = parseCommand(spec, own);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  const file = singleFile('restore', positionals);
  if (qemuArgv.length === 0) {
    throw new UsageError(
      'restore: the QEMU command line is missing after --',
      'append -- and the command line the VM was started with',
    );
  }
  // Detached restored QEMUs outlive qsnap; the run directories of those that have exited go now.
  await sweepStaleRunDirs();
  const json = values.json ?? false;
  const out = makeOutput(json);
  const bar = new ProgressBar(!json);
  const op = restore({
    file: resolve(file),
    argv: qemuArgv,
    lazy: values.lazy ?? false,
    paused: values.paused ?? false,
    verify: values['verify-all'] ? 'full' : 'auto',
    ...(values.qmp ? { qmp: resolve(values.qmp) } : {}),
    ...(values['overlay-dir'] ? { overlayDir: values['overlay-dir'] } : {}),
    ...(values['run-dir'] ? { runDir: values['run-dir'] } : {}),
  }).on(bar.onEvent);
  try {
    const r = await op.result;
    bar.clear();
    const { argv: _argv, vm: _vm, ...summary } = r;
    out.result({ ok: true, ...summary });
    out.text(`restored  ${resolve(file)} (${r.mode}) in ${formatMs(r.restoreMs)}; guest ${r.runState}`);
    out.text(`QEMU      pid ${r.pid}, QMP ${r.qmp}, log ${r.logFile}`);
    for (const d of r.disks) out.text(`disk      ${d.device}: ${d.overlayFile} (backed by ${d.frozenFile})`);
    return 0;
  } finally {
    bar.clear();
  }
}
