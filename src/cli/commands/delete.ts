import { type CollectResult, collect } from '../../store/collect.js';
import { findSnapshot } from '../../store/restore.js';
import { emptyCatalog } from '../../store/schema.js';
import { parseCommand, UsageError } from '../args.js';
import { remoteOperation } from '../daemon.js';
import type { CliEnv } from '../env.js';
import { makeOutput } from '../output.js';
import { runOperation } from '../run.js';
import { openStore, STORE_HELP, STORE_OPTION } from '../store.js';
import { printCollection } from './gc.js';

const spec = {
  name: 'delete',
  summary:
    'Delete snapshots from the store without losing data: it prints its plan, then carries it out.\n' +
    'A disk layer goes only when no remaining snapshot and no QEMU needs it; a layer in the middle of\n' +
    'a chain that is still needed is merged into the layer above it (live, by the running VM, which\n' +
    'keeps running and is never paused; offline with qemu-img), or kept and reported with who holds it.\n' +
    'Your own images are never touched.',
  usage: 'qsnap delete <name>... [--dry-run] [--json] [--store <dir>]',
  options: { 'dry-run': { type: 'boolean' }, json: { type: 'boolean' }, ...STORE_OPTION },
  help: {
    'dry-run': 'print the plan only',
    json: 'print one JSON object: the plan and what was done',
    ...STORE_HELP,
  },
  allowPositionals: true,
  examples: ['qsnap delete old', 'qsnap delete a b c --dry-run'],
} as const;

export async function deleteCommand(argv: string[], env: CliEnv): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  if (positionals.length === 0) throw new UsageError('delete: name at least one snapshot', 'see qsnap list');
  const out = makeOutput(values.json ?? false);
  if (env.daemonUrl) {
    const names = [...new Set(positionals)];
    const op = remoteOperation(
      env,
      async (c) =>
        (await c.delete({ names, dryRun: values['dry-run'] ?? false })) as unknown as CollectResult,
    );
    // The daemon's plan already names the snapshots.
    return printCollection((await runOperation(op, out, env)).result, emptyCatalog(), out);
  }
  const store = await openStore(env, values.store, out);
  const catalog = await store.read();
  const ids = [...new Set(positionals)].map((name) => findSnapshot(catalog, name).id);
  const op = collect(store, { deleting: ids, dryRun: values['dry-run'] ?? false, faults: env.faults });
  return printCollection((await runOperation(op, out, env)).result, catalog, out);
}
