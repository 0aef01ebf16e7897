import { verifySnapshot } from '../../engine/verify.js';
import { parseCommand, singleFile } from '../args.js';
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
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  const file = singleFile('verify', positionals);
  const json = values.json ?? false;
  const out = makeOutput(json);
  const bar = new ProgressBar(!json);
  try {
    const result = await verifySnapshot(file).on(bar.onEvent).result;
    bar.clear();
    out.result({ ok: true, ...result });
    out.text(
      `ok        ${result.file}: ${formatBytes(result.bytesVerified)} verified in ${formatMs(result.durationMs)} (${result.dataPages} data pages, ${result.zeroPages} zero pages); ${result.diskLayers.length} disk layer(s) present`,
    );
    return 0;
  } finally {
    bar.clear();
  }
}
