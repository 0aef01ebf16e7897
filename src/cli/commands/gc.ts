import { sweepMachines } from '../../harness/leftovers.js';
import { type CollectResult, collect } from '../../store/collect.js';
import { who } from '../../store/plan.js';
import { type Catalog, emptyCatalog } from '../../store/schema.js';
import { parseCommand } from '../args.js';
import { remoteOperation } from '../daemon.js';
import type { CliEnv } from '../env.js';
import { formatBytes, formatMs, makeOutput, type Output } from '../output.js';
import { runOperation } from '../run.js';
import { openStore, STORE_HELP, STORE_OPTION } from '../store.js';

const spec = {
  name: 'gc',
  summary:
    'Remove what nothing needs any more: restore overlays of finished restores, layers of deleted\n' +
    'snapshots that a VM held until it stopped, files of killed runs, run directories of QEMUs that\n' +
    'exited. Never a file that a process has open or that a snapshot or a VM needs.',
  usage: 'qsnap gc [--dry-run] [--json] [--store <dir>]',
  options: { 'dry-run': { type: 'boolean' }, json: { type: 'boolean' }, ...STORE_OPTION },
  help: {
    'dry-run': 'print the plan only',
    json: 'print one JSON object: the plan and what was done',
    ...STORE_HELP,
  },
  examples: ['qsnap gc --dry-run', 'qsnap gc'],
} as const;

export async function gcCommand(argv: string[], env: CliEnv): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values } = parsed;
  const out = makeOutput(values.json ?? false);
  if (env.daemonUrl) {
    const op = remoteOperation(
      env,
      async (c) => (await c.gc({ dryRun: values['dry-run'] ?? false })) as unknown as CollectResult,
    );
    return printCollection((await runOperation(op, out, env)).result, emptyCatalog(), out);
  }
  const store = await openStore(env, values.store, out);
  const catalog = await store.read();
  const op = collect(store, {
    deleting: [],
    dryRun: values['dry-run'] ?? false,
    sweepRunDirs: true,
    faults: env.faults,
  });
  const collected = (await runOperation(op, out, env)).result;
  // Test harnesses (Machine) killed by SIGKILL leave a QEMU, overlays and checkpoints behind.
  const sweptMachines = await sweepMachines(undefined, { dryRun: collected.dryRun });
  return printCollection({ ...collected, sweptMachines }, catalog, out);
}

function intentLine(line: string, will: string): string {
  if (line.startsWith('keep ')) return `keep    ${line.slice(5)}`;
  if (line.startsWith('recovered ')) return `${will}recover ${line.slice(10)}`;
  return `${will}remove  ${line}`;
}

/** The plan, then what was done (or, with --dry-run, what would be). */
export function printCollection(
  r: CollectResult & { sweptMachines?: Awaited<ReturnType<typeof sweepMachines>> },
  catalog: Catalog,
  out: Output,
): number {
  const names = r.plan.snapshots.map((id) => catalog.snapshots[id]?.name ?? id);
  out.result({ ok: true, ...r, plan: { ...r.plan, snapshots: names } });
  const will = r.dryRun ? 'would ' : '';
  for (const name of names) out.text(`${will}delete  snapshot ${name}`);
  for (const m of r.dryRun ? r.plan.merges.map((m) => ({ ...m, via: m.via.kind })) : r.merged) {
    const done =
      'ms' in m
        ? ` — ${formatBytes(m.bytes)} in ${formatMs(m.ms)}${m.pauses ? `, guest paused ${m.pauses}×` : ', guest not paused'}`
        : '';
    const failed = 'error' in m && m.error ? ` — FAILED: ${m.error}` : '';
    out.text(`${will}merge   ${m.layers.join(', ')} into ${m.into} (${m.via})${done}${failed}`);
  }
  for (const f of r.dryRun ? r.plan.remove : r.removed) out.text(`${will}remove  ${f.path} (${f.reason})`);
  for (const f of r.dryRun ? r.plan.wait : r.waiting)
    out.text(
      `wait    ${f.path} (${f.reason}; held by ${f.holders.map(who).join(', ')}): qsnap gc removes it later`,
    );
  for (const f of r.dryRun ? r.plan.keep : r.kept) out.text(`keep    ${f.path} (${f.reason})`);
  for (const f of r.unmerged ?? [])
    out.text(`keep    ${f.path} (its merge did not happen; a later delete or gc merges it)`);
  for (const d of r.sweptRunDirs ?? []) out.text(`${will}remove  ${d} (run directory of a QEMU that exited)`);
  for (const d of r.sweptIntents ?? []) out.text(intentLine(d, will));
  const machines = r.sweptMachines;
  for (const d of machines?.dirs ?? []) out.text(`${will}remove  ${d} (a test harness that is gone)`);
  for (const pid of machines?.qemus ?? []) out.text(`${will}stop    QEMU pid ${pid} (its harness is gone)`);
  for (const f of machines?.files ?? []) out.text(`${will}remove  ${f} (an overlay of that harness)`);
  if (
    names.length +
      r.plan.merges.length +
      r.plan.remove.length +
      (r.sweptRunDirs?.length ?? 0) +
      (r.sweptIntents?.length ?? 0) +
      (machines?.dirs.length ?? 0) ===
    0
  )
    out.text('nothing to do');
  return 0;
}
