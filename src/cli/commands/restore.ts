import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { restore } from '../../engine/restore/restore.js';
import type { RestoreOptions, RestoreResult } from '../../engine/restore/types.js';
import { type StoreRestoreResult, storeRestore } from '../../store/restore.js';
import { sweepStaleRunDirs } from '../../vm/run-dir.js';
import { parseCommand, UsageError } from '../args.js';
import { terminalConfirm } from '../confirm.js';
import { refuseWithDaemon, remoteOperation } from '../daemon.js';
import type { CliEnv } from '../env.js';
import { formatMs, makeOutput, type Output } from '../output.js';
import { runOperation } from '../run.js';
import { openStore, STORE_HELP, STORE_OPTION } from '../store.js';

const spec = {
  name: 'restore',
  summary:
    'Start a new QEMU from a snapshot: a snapshot of the store by name (its recorded command line is\n' +
    'used; one given after -- wins), or a snapshot file with the command line the VM was started with.\n' +
    'Each snapshotted disk gets a fresh qcow2 overlay backed by the frozen layer (never written), so\n' +
    'one snapshot restores any number of times. QEMU keeps running after qsnap exits; when the\n' +
    'snapshotted VM still runs, the restored one gets its own QMP and other sockets in its run directory.\n' +
    '--lazy maps guest RAM straight from the snapshot file (private mapping): restore time does\n' +
    'not grow with RAM size; refused with virtio-balloon or virtio-mem devices on QEMU < 8.2.',
  usage: 'qsnap restore <name|file> [--lazy] [--paused] [--qmp <socket>] [--json] [-- <qemu command line>]',
  options: {
    lazy: { type: 'boolean' },
    paused: { type: 'boolean' },
    qmp: { type: 'string' },
    ...STORE_OPTION,
    'trust-cmdline': { type: 'boolean' },
    'overlay-dir': { type: 'string' },
    'run-dir': { type: 'string' },
    'verify-all': { type: 'boolean' },
    json: { type: 'boolean' },
  },
  help: {
    lazy: 'map RAM from the snapshot file instead of loading it',
    paused: 'leave the guest paused after loading',
    qmp: 'QMP socket to add if the command line has none (default: <run-dir>/qmp.sock)',
    ...STORE_HELP,
    'trust-cmdline':
      'run the command line an imported snapshot came with without asking (on a terminal qsnap shows it and asks)',
    'overlay-dir': 'where the restore overlays go (default: beside each frozen disk layer)',
    'run-dir': "directory for QEMU's log (default: a new temp directory)",
    'verify-all':
      'verify every checksum of the file before loading (lazy mode does not read mapped RAM otherwise)',
    json: 'print one JSON object (restoreMs, pid, qmp, mode, disks…)',
  },
  allowPositionals: true,
  examples: [
    'qsnap restore clean',
    'qsnap restore clean --lazy --json',
    'qsnap restore vm.qsnap -- qemu-system-x86_64 -m 2G -drive file=disk.qcow2,if=virtio -qmp unix:vm.sock,server=on,wait=off',
  ],
} as const;

export async function restoreCommand(argv: string[], env: CliEnv): Promise<number> {
  const dash = argv.indexOf('--');
  const qemuArgv = dash >= 0 ? argv.slice(dash + 1) : [];
  const parsed = parseCommand(spec, dash >= 0 ? argv.slice(0, dash) : argv);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  const [target, ...extra] = positionals;
  if (!target || extra.length)
    throw new UsageError('restore: give one snapshot name or file', 'see qsnap restore --help');
  const out = makeOutput(values.json ?? false);
  if (env.daemonUrl) {
    refuseWithDaemon('restore', values, ['qmp', 'store', 'overlay-dir', 'run-dir', 'verify-all']);
    const op = remoteOperation(
      env,
      async (c, onEvent) =>
        (await c.restore(
          {
            name: target,
            lazy: values.lazy ?? false,
            paused: values.paused ?? false,
            trustCmdline: values['trust-cmdline'] ?? false,
            ...(qemuArgv.length ? { argv: qemuArgv } : {}),
          },
          onEvent,
        )) as unknown as StoreRestoreResult,
    );
    return report((await runOperation(op, out, env)).result, target, out);
  }
  // Detached restored QEMUs outlive qsnap; the run directories of those that have exited go now.
  await sweepStaleRunDirs();
  const common: Omit<RestoreOptions, 'file' | 'argv'> = {
    lazy: values.lazy ?? false,
    paused: values.paused ?? false,
    verify: values['verify-all'] ? 'full' : 'auto',
    ...(values.qmp ? { qmp: resolve(values.qmp) } : {}),
    ...(values['overlay-dir'] ? { overlayDir: values['overlay-dir'] } : {}),
    ...(values['run-dir'] ? { runDir: values['run-dir'] } : {}),
  };
  if (await isFile(target)) {
    if (qemuArgv.length === 0)
      throw new UsageError(
        'restore: the QEMU command line is missing after --',
        'append -- and the command line the VM was started with',
      );
    return report(
      (await runOperation(restore({ ...common, file: resolve(target), argv: qemuArgv }), out, env)).result,
      resolve(target),
      out,
    );
  }
  const store = await openStore(env, values.store, out);
  const confirm = values['trust-cmdline'] ? undefined : terminalConfirm(values.json ?? false);
  const op = storeRestore(store, {
    ...common,
    name: target,
    ...(qemuArgv.length ? { argv: qemuArgv } : {}),
    trustCmdline: values['trust-cmdline'] ?? false,
    ...(confirm ? { confirmCmdline: confirm } : {}),
  });
  return report((await runOperation(op, out, env)).result, target, out);
}

/** A path to an existing file is a loose snapshot; anything else is a name in the store. */
async function isFile(target: string): Promise<boolean> {
  return stat(target).then(
    (s) => s.isFile(),
    () => false,
  );
}

function report(r: RestoreResult | StoreRestoreResult, target: string, out: Output): number {
  const { argv: _argv, vm: _vm, ...summary } = r as StoreRestoreResult & { vm?: unknown };
  out.result({ ok: true, ...summary });
  const how = r.loadPath === 'mapped-ram' ? `${r.mode}, QEMU read the file: mapped-ram` : r.mode;
  out.text(`restored  ${target} (${how}) in ${formatMs(r.restoreMs)}; guest ${r.runState}`);
  out.text(`QEMU      pid ${r.pid}, QMP ${r.qmp}, log ${r.logFile}`);
  for (const d of r.disks) out.text(`disk      ${d.device}: ${d.overlayFile} (backed by ${d.frozenFile})`);
  for (const [from, to] of Object.entries(r.relocated))
    out.text(`socket    ${from} → ${to} (the snapshotted VM still runs)`);
  if ('cmdline' in r) out.text(`cmdline   ${r.cmdline}`);
  return 0;
}
