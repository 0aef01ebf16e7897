import { exportStream } from '../../engine/restore/export.js';
import { parseCommand, singleFile, UsageError } from '../args.js';
import { formatBytes, formatMs, makeOutput } from '../output.js';
import { ProgressBar } from '../progress.js';

const spec = {
  name: 'export',
  summary:
    'Write a snapshot as a plain QEMU migration stream, which stock QEMU loads with\n' +
    '`-incoming "exec:cat <stream>"` (start it with the VM\'s command line; disks as in the snapshot).',
  usage: 'qsnap export <file> --qemu-stream <out> [--overwrite] [--json]',
  options: {
    'qemu-stream': { type: 'string' },
    overwrite: { type: 'boolean' },
    json: { type: 'boolean' },
  },
  help: {
    'qemu-stream': 'the stream file to write',
    overwrite: 'replace an existing file',
    json: 'print one JSON object',
  },
  allowPositionals: true,
  examples: [
    'qsnap export vm.qsnap --qemu-stream vm.migration && qemu-system-x86_64 … -incoming "exec:cat vm.migration"',
  ],
} as const;

export async function exportCommand(argv: string[]): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  const file = singleFile('export', positionals);
  if (!values['qemu-stream'])
    throw new UsageError('export: --qemu-stream <out> is required', 'see qsnap export --help');
  const json = values.json ?? false;
  const out = makeOutput(json);
  const bar = new ProgressBar(!json);
  const op = exportStream({ file, out: values['qemu-stream'], overwrite: values.overwrite ?? false }).on(
    bar.onEvent,
  );
  try {
    const r = await op.result;
    bar.clear();
    out.result({ ok: true, ...r });
    out.text(`exported  ${r.out}: ${formatBytes(r.bytes)} in ${formatMs(r.ms)}`);
    return 0;
  } finally {
    bar.clear();
  }
}
