import { drawTree, listSnapshots, type SnapshotRow } from '../../store/list.js';
import { parseCommand } from '../args.js';
import { withDaemon } from '../daemon.js';
import type { CliEnv } from '../env.js';
import { formatBytes, formatMs, makeOutput, type Output } from '../output.js';
import { openStore, STORE_HELP, STORE_OPTION } from '../store.js';

const spec = {
  name: 'list',
  summary:
    'List the snapshots of the store: name, VM, time, parent, RAM, bytes on disk (the file and the\n' +
    'disk layers only it holds: what deleting it frees), guest pause, and state (ok, or which layer\n' +
    'is missing or was changed behind qsnap’s back).',
  usage: 'qsnap list [--tree] [--json] [--store <dir>]',
  options: { tree: { type: 'boolean' }, json: { type: 'boolean' }, ...STORE_OPTION },
  help: { tree: 'draw the parent tree', json: 'print one JSON object: {snapshots: [...]}', ...STORE_HELP },
  examples: ['qsnap list', 'qsnap list --tree', 'qsnap list --json | jq -r ".snapshots[].name"'],
} as const;

export async function listCommand(argv: string[], env: CliEnv): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values } = parsed;
  const out = makeOutput(values.json ?? false);
  let dir: string;
  let rows: SnapshotRow[];
  if (env.daemonUrl) {
    const r = await withDaemon(env, (c) => c.list());
    dir = String((r as Record<string, unknown>)['store']);
    rows = r.snapshots as unknown as SnapshotRow[];
  } else {
    const store = await openStore(env, values.store, out);
    dir = store.dir;
    rows = await listSnapshots(store);
  }
  out.result({ ok: true, store: dir, snapshots: rows });
  printRows(rows, dir, values.tree ?? false, out);
  return 0;
}

function printRows(rows: SnapshotRow[], dir: string, tree: boolean, out: Output): void {
  if (rows.length === 0) out.text(`no snapshots in ${dir}`);
  else if (tree) for (const line of drawTree(rows)) out.text(line);
  else {
    const header = ['NAME', 'VM', 'TAKEN', 'PARENT', 'RAM', 'ON DISK', 'PAUSE', 'STATE'];
    const table = rows.map((r) => [
      r.name,
      r.vm,
      r.createdAt.replace('T', ' ').slice(0, 19),
      r.parent ?? '-',
      formatBytes(r.ramBytes),
      formatBytes(r.bytes.total),
      formatMs(r.downtimeMs),
      r.state,
    ]);
    const widths = header.map((h, i) => Math.max(h.length, ...table.map((row) => row[i]!.length)));
    for (const row of [header, ...table])
      out.text(
        row
          .map((cell, i) => cell.padEnd(widths[i]!))
          .join('  ')
          .trimEnd(),
      );
  }
}
