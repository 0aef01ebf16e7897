import { resolve } from 'node:path';
import type { StreamTransport } from '../../engine/snapshot/receiver.js';
import { snapshot } from '../../engine/snapshot/snapshot.js';
import type { SnapshotResult } from '../../engine/snapshot/types.js';
import { type StoreSnapshotResult, storeSnapshot } from '../../store/snapshot.js';
import { parseCommand, parseSize, splitCommandLine, UsageError } from '../args.js';
import { refuseWithDaemon, remoteOperation } from '../daemon.js';
import type { CliEnv } from '../env.js';
import { formatBytes, formatMs, makeOutput, type Output } from '../output.js';
import { runOperation } from '../run.js';
import { openStore, STORE_HELP, STORE_OPTION } from '../store.js';

const spec = {
  name: 'snapshot',
  summary:
    'Take a live point-in-time snapshot of a running VM: the guest pauses for milliseconds while its\n' +
    'disks are frozen (each gets a new qcow2 overlay beside it) and RAM is write-protected; RAM then\n' +
    'streams into one snapshot file in the background while the guest runs. A VM whose RAM QEMU cannot\n' +
    'write-protect (restored with --lazy from a file on disk) is snapshotted by pre-copy instead: RAM is\n' +
    'sent while it runs and the guest pauses once, longer (a few hundred ms), when the disks are frozen.\n' +
    "With --name the snapshot goes into the store, with the VM's QEMU command line (read from the QEMU\n" +
    'process), so `qsnap restore NAME` needs nothing else; --out writes a loose file instead.',
  usage:
    'qsnap snapshot --qmp <socket> (--name <name> | --out <file>) [--overwrite] [--max-bandwidth <rate>] [--transport pipe|unix] [--json]',
  options: {
    qmp: { type: 'string' },
    name: { type: 'string', short: 'n' },
    out: { type: 'string', short: 'o' },
    ...STORE_OPTION,
    cmdline: { type: 'string' },
    'max-chain': { type: 'string' },
    'max-bandwidth': { type: 'string' },
    'overlay-dir': { type: 'string' },
    transport: { type: 'string' },
    overwrite: { type: 'boolean' },
    json: { type: 'boolean' },
  },
  help: {
    qmp: "the VM's QMP socket",
    name: 'a name in the store: 1-64 of A-Z a-z 0-9 . _ -',
    out: 'write a loose snapshot file instead of putting it in the store',
    ...STORE_HELP,
    cmdline:
      "the VM's QEMU command line, when qsnap cannot read it from the QEMU process (QMP over TCP from elsewhere)",
    'max-chain':
      "keep the running VM's disk chain at most this long (default 8; older layers are streamed into its overlay)",
    'max-bandwidth': 'limit the RAM stream, bytes per second (e.g. 200M); default: unlimited',
    'overlay-dir': 'where the new disk overlays go (default: beside each disk image)',
    transport:
      "how the RAM stream reaches qsnap: pipe (QEMU's exec: pipe; faster, ~5 ms more pause under TCG for QEMU's fork) or unix (a socket); default: pipe for a local QEMU qsnap may read, else unix",
    overwrite: 'replace a snapshot of that name (or the file at --out)',
    json: 'print one JSON object with the result instead of text and a progress bar',
  },
  examples: [
    'qsnap snapshot --qmp /run/vm/qmp.sock --name clean',
    'qsnap snapshot --qmp vm.sock --name ckpt --overwrite --json',
    'qsnap snapshot --qmp /run/vm/qmp.sock --out vm.qsnap',
  ],
} as const;

export async function snapshotCommand(argv: string[], env: CliEnv): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values } = parsed;
  if (!values.qmp) throw new UsageError('snapshot: --qmp <socket> is required', 'see qsnap snapshot --help');
  if (!values.name === !values.out)
    throw new UsageError(
      'snapshot: give --name <name> (into the store) or --out <file> (a loose file)',
      'see qsnap snapshot --help',
    );
  const out = makeOutput(values.json ?? false);
  if (env.daemonUrl) {
    refuseWithDaemon('snapshot', values, [
      'out',
      'store',
      'cmdline',
      'max-chain',
      'overlay-dir',
      'transport',
    ]);
    const qmp = resolve(values.qmp);
    const op = remoteOperation(env, async (c, onEvent) => {
      const { vm } = await c.attach({ qmp });
      return (await c.snapshot(
        {
          vm,
          name: values.name!,
          overwrite: values.overwrite ?? false,
          ...(values['max-bandwidth']
            ? { maxBandwidth: parseSize(values['max-bandwidth'], '--max-bandwidth') }
            : {}),
        },
        onEvent,
      )) as unknown as StoreSnapshotResult;
    });
    return report(await runOperation(op, out, env), out);
  }
  const engine = {
    qmp: values.qmp,
    stateDir: env.stateDir,
    faults: env.faults,
    ...(values['max-bandwidth']
      ? { maxBandwidth: parseSize(values['max-bandwidth'], '--max-bandwidth') }
      : {}),
    ...(values['overlay-dir'] ? { overlayDir: values['overlay-dir'] } : {}),
    ...(values.transport ? { transport: streamTransport(values.transport) } : {}),
  };
  if (values.out) {
    const op = snapshot({ ...engine, out: resolve(values.out), overwrite: values.overwrite ?? false });
    return report(await runOperation(op, out, env), out);
  }
  const store = await openStore(env, values.store, out);
  const op = storeSnapshot(store, {
    ...engine,
    name: values.name!,
    overwrite: values.overwrite ?? false,
    ...(values.cmdline ? { cmdline: splitCommandLine(values.cmdline) } : {}),
    ...(values['max-chain'] ? { maxChain: maxChain(values['max-chain']) } : {}),
  });
  return report(await runOperation(op, out, env), out);
}

function maxChain(text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 2)
    throw new UsageError(`--max-chain: ${text} is not a whole number of at least 2`);
  return n;
}

function report(
  { result, notes }: { result: SnapshotResult | StoreSnapshotResult; notes: string[] },
  out: Output,
): number {
  out.result({ ok: true, ...result, ...(notes.length ? { notes } : {}) });
  for (const note of notes) out.text(note);
  if ('name' in result) out.text(`snapshot  ${result.name} (store: ${result.file})`);
  else out.text(`snapshot  ${result.file}`);
  out.text(`point     ${result.pointInTime} (${result.strategy})`);
  out.text(`downtime  ${formatMs(result.downtimeMs)} guest paused`);
  out.text(`total     ${formatMs(result.totalMs)}, RAM stream ${formatMs(result.streamMs)}`);
  out.text(
    `RAM       ${formatBytes(result.ramBytes)}: ${result.pagesWritten} pages written, ${result.zeroPages} zero pages; file ${formatBytes(result.allocatedBytes)} on disk`,
  );
  for (const d of result.disks)
    out.text(`disk      ${d.device}: frozen ${d.frozenFile}; the VM now writes to ${d.overlayFile}`);
  for (const d of result.skippedDisks) out.text(`disk      ${d.device}: skipped (${d.reason})`);
  if ('name' in result) {
    out.text(
      `cmdline   ${result.cmdline === 'none' ? 'none recorded: restore it with -- <command line>' : result.cmdline}`,
    );
    if (result.shortening)
      out.text(
        `chain     ${result.shortening.from} layers: QEMU streams the older ones into the live overlay (${result.shortening.job})`,
      );
  }
  return 0;
}

function streamTransport(text: string): StreamTransport {
  if (text === 'pipe' || text === 'unix') return text;
  throw new UsageError(`snapshot: --transport is pipe or unix, not ${text}`, 'see qsnap snapshot --help');
}
