import { importBundle } from '../../store/bundle.js';
import { parseCommand, UsageError } from '../args.js';
import type { CliEnv } from '../env.js';
import { formatMs, makeOutput } from '../output.js';
import { runOperation } from '../run.js';
import { openStore, STORE_HELP, STORE_OPTION } from '../store.js';

const spec = {
  name: 'import',
  summary:
    'Import a bundle (qsnap export --bundle) into the store. It is verified before it lands: its\n' +
    'structure, every checksum, the snapshot file, and each disk being a standalone image. The\n' +
    'command line it carries is shown; `qsnap restore` asks before running it on a terminal, and\n' +
    'runs it in a script only with --trust-cmdline.',
  usage: 'qsnap import <bundle> [--name <name>] [--json] [--store <dir>]',
  options: { name: { type: 'string', short: 'n' }, json: { type: 'boolean' }, ...STORE_OPTION },
  help: {
    name: 'the name in this store (default: the name it had)',
    json: 'print one JSON object',
    ...STORE_HELP,
  },
  allowPositionals: true,
  examples: ['qsnap import clean.qsnapb', 'qsnap import ci.qsnapb --name ci-base'],
} as const;

export async function importCommand(argv: string[], env: CliEnv): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  const [file, ...extra] = positionals;
  if (!file || extra.length) throw new UsageError('import: give one bundle file', 'see qsnap import --help');
  const out = makeOutput(values.json ?? false);
  const store = await openStore(env, values.store, out);
  const op = importBundle(store, { file, ...(values.name ? { name: values.name } : {}) });
  const { result: r } = await runOperation(op, out, env);
  out.result({ ok: true, ...r });
  out.text(`imported  ${r.name} (${r.id}) in ${formatMs(r.ms)}`);
  for (const d of r.disks) out.text(`disk      ${d.device}: ${d.file}`);
  if (r.cmdline) {
    out.text(`cmdline   ${r.cmdline.join(' ')}`);
    out.text(
      `          (from another machine: read it; \`qsnap restore ${r.name}\` asks before it runs it, --trust-cmdline does not ask; or give your own after --)`,
    );
  }
  return 0;
}
