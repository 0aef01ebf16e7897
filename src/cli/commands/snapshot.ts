import { resolve } from 'node:path';
import { snapshot } from '../../engine/snapshot/snapshot.js';
import { parseCommand, parseSize, UsageError } from '../args.js';
import type { CliEnv } from '../env.js';
import { formatBytes, formatMs, makeOutput } from '../output.js';
import { ProgressBar } from '../progress.js';

const spec = {
  name: 'snapshot',
  summary:
    'Take a live point-in-time snapshot of a running VM: the guest pauses for milliseconds while its\n' +
    'disks are frozen (each gets a new qcow2 overlay beside it) and RAM is write-protected; RAM then\n' +
    'streams into one snapshot file in the background while the guest runs. A VM whose RAM QEMU cannot\n' +
    'write-protect (restored with --lazy from a file on disk) is snapshotted by pre-copy instead: RAM is\n' +
    'sent while it runs and the guest pauses once, longer (a few hundred ms), when the disks are frozen.',
  usage: 'qsnap snapshot --qmp <socket> --out <file> [--max-bandwidth <rate>] [--overwrite] [--json]',
  options: {
    qmp: { type: 'string' },
    out: { type: 'string', short: 'o' },
    'max-bandwidth': { type: 'string' },
    'overlay-dir': { type: 'string' },
    overwrite: { type: 'boolean' },
    json: { type: 'boolean' },
  },
  help: {
    qmp: "the VM's QMP socket",
    out: 'the snapshot file to create',
    'max-bandwidth': 'limit the RAM stream, bytes per second (e.g. 200M); default: unlimited',
    'overlay-dir': 'where the new disk overlays go (default: beside each disk image)',
    overwrite: 'replace an existing file at --out',
    json: 'print one JSON object with the result instead of text and a progress bar',
  },
  examples: [
    'qsnap snapshot --qmp /run/vm/qmp.sock --out vm.qsnap',
    'qsnap snapshot --qmp vm.sock --out ckpt.qsnap --json',
  ],
} as const;

export async function snapshotCommand(argv: string[], env: CliEnv): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values } = parsed;
  if (!values.qmp) throw new UsageError('snapshot: --qmp <socket> is required', 'see qsnap snapshot --help');
  if (!values.out) throw new UsageError('snapshot: --out <file> is required', 'see qsnap snapshot --help');
  const json = values.json ?? false;
  const out = makeOutput(json);
  const bar = new ProgressBar(!json);
  const notes: string[] = [];
  const op = snapshot({
    qmp: values.qmp,
    out: resolve(values.out),
    overwrite: values.overwrite ?? false,
    stateDir: env.stateDir,
    faults: env.faults,
    ...(values['max-bandwidth']
      ? { maxBandwidth: parseSize(values['max-bandwidth'], '--max-bandwidth') }
      : {}),
    ...(values['overlay-dir'] ? { overlayDir: values['overlay-dir'] } : {}),
  })
    .on(bar.onEvent)
    .on((event) => {
      // E.g. the recovery of an earlier, interrupted qsnap: it may have resumed the guest.
      if (event.type === 'info') notes.push(event.message);
    });
  const cancel = () => op.cancel(new UsageError('interrupted'));
  process.once('SIGINT', cancel);
  try {
    const result = await op.result;
    bar.clear();
    out.result({ ok: true, ...result, ...(notes.length ? { notes } : {}) });
    for (const note of notes) out.text(note);
    out.text(`snapshot  ${result.file}`);
    out.text(`point     ${result.pointInTime} (${result.strategy})`);
    out.text(`downtime  ${formatMs(result.downtimeMs)} guest paused`);
    out.text(`total     ${formatMs(result.totalMs)}, RAM stream ${formatMs(result.streamMs)}`);
    out.text(
      `RAM       ${formatBytes(result.ramBytes)}: ${result.pagesWritten} pages written, ${result.zeroPages} zero pages; file ${formatBytes(result.allocatedBytes)} on disk`,
    );
    for (const d of result.disks)
      out.text(`disk      ${d.device}: frozen ${d.frozenFile}; the VM now writes to ${d.overlayFile}`);
    for (const d of result.skippedDisks) out.text(`disk      ${d.device}: skipped (${d.reason})`);
    return 0;
  } finally {
    bar.clear();
    process.off('SIGINT', cancel);
  }
}
