import { stat } from 'node:fs/promises';
import { exportStream } from '../../engine/restore/export.js';
import { exportBundle } from '../../store/bundle.js';
import { findSnapshot } from '../../store/restore.js';
import { parseCommand, UsageError } from '../args.js';
import type { CliEnv } from '../env.js';
import { formatBytes, formatMs, makeOutput, type Output } from '../output.js';
import { runOperation } from '../run.js';
import { openStore, STORE_HELP, STORE_OPTION } from '../store.js';

const spec = {
  name: 'export',
  summary:
    'Export a snapshot. --bundle: one portable, checksummed file with the snapshot and each disk\n' +
    'flattened (qemu-img convert), for another machine or CI runner (qsnap import reads it).\n' +
    '--qemu-stream: a plain QEMU migration stream, which stock QEMU loads with\n' +
    '`-incoming "exec:cat <stream>"` (start it with the VM\'s command line; disks as in the snapshot).',
  usage: 'qsnap export <name|file> (--bundle <out> | --qemu-stream <out>) [--overwrite] [--json]',
  options: {
    bundle: { type: 'string' },
    'qemu-stream': { type: 'string' },
    ...STORE_OPTION,
    overwrite: { type: 'boolean' },
    json: { type: 'boolean' },
  },
  help: {
    bundle: 'the bundle to write (a snapshot of the store, by name)',
    'qemu-stream': 'the stream file to write',
    ...STORE_HELP,
    overwrite: 'replace an existing file',
    json: 'print one JSON object',
  },
  allowPositionals: true,
  examples: [
    'qsnap export clean --bundle clean.qsnapb   # then on the other machine: qsnap import clean.qsnapb',
    'qsnap export vm.qsnap --qemu-stream vm.migration && qemu-system-x86_64 … -incoming "exec:cat vm.migration"',
  ],
} as const;

export async function exportCommand(argv: string[], env: CliEnv): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  const [target, ...extra] = positionals;
  if (!target || extra.length)
    throw new UsageError('export: give one snapshot name or file', 'see qsnap export --help');
  if (!values.bundle === !values['qemu-stream'])
    throw new UsageError('export: give --bundle <out> or --qemu-stream <out>', 'see qsnap export --help');
  const out = makeOutput(values.json ?? false);
  const overwrite = values.overwrite ?? false;
  const isFile = await stat(target).then(
    (s) => s.isFile(),
    () => false,
  );
  if (values.bundle) {
    if (isFile)
      throw new UsageError('export --bundle: name a snapshot of the store', 'qsnap list shows the names');
    const store = await openStore(env, values.store, out);
    const { result: r } = await runOperation(
      exportBundle(store, { name: target, out: values.bundle, overwrite }),
      out,
      env,
    );
    out.result({ ok: true, ...r });
    out.text(`exported  ${r.name} → ${r.file}: ${formatBytes(r.bytes)} in ${formatMs(r.ms)}`);
    for (const d of r.disks) out.text(`disk      ${d.device}: ${formatBytes(d.bytes)} (flattened)`);
    return 0;
  }
  const file = isFile ? target : await storeFile(env, values.store, target, out);
  const { result: r } = await runOperation(
    exportStream({ file, out: values['qemu-stream']!, overwrite }),
    out,
    env,
  );
  out.result({ ok: true, ...r });
  out.text(`exported  ${r.out}: ${formatBytes(r.bytes)} in ${formatMs(r.ms)}`);
  return 0;
}

async function storeFile(env: CliEnv, dir: string | undefined, name: string, out: Output): Promise<string> {
  const store = await openStore(env, dir, out);
  return store.snapshotPath(findSnapshot(await store.read(), name));
}
