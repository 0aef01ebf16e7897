import { openSnapshot } from '../../format/index.js';
import { helpText, parse, UsageError } from '../args.js';
import { formatBytes, formatMs, makeOutput } from '../output.js';
import { ProgressBar } from '../progress.js';

const spec = {
  name: 'verify',
  summary:
    'Check every checksum of a snapshot file (RAM pages, page table, device state, manifest, trailer)\n' +
    'and that its disk layers exist. Exits 0 only when everything holds; otherwise prints one line\n' +
    'saying what is wrong.',
  usage: 'qsnap verify <file> [--json]',
  options: { json: { type: 'boolean' } },
  help: { json: 'print one JSON object with the result' },
  allowPositionals: true,
  examples: ['qsnap verify vm.qsnap && echo intact'],
} as const;

export async function verifyCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parse(spec, argv);
  if (values.help) {
    process.stdout.write(helpText(spec));
    return 0;
  }
  const [file, ...extra] = positionals;
  if (!file || extra.length)
    throw new UsageError('verify: give exactly one snapshot file', 'see qsnap verify --help');
  const json = values.json ?? false;
  const out = makeOutput(json);
  const bar = new ProgressBar(!json);
  const reader = await openSnapshot(file);
  try {
    const result = await reader.verify({
      onProgress: (p) => bar.onEvent({ type: 'progress', doneBytes: p.bytesDone, totalBytes: p.bytesTotal }),
    });
    bar.clear();
    out.result({ ok: true, file: reader.path, ...result });
    out.text(
      `ok        ${reader.path}: ${formatBytes(result.bytesVerified)} verified in ${formatMs(result.durationMs)} (${result.dataPages} data pages, ${result.zeroPages} zero pages)`,
    );
    return 0;
  } finally {
    bar.clear();
    await reader.close();
  }
}
