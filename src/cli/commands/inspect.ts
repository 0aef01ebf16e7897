import { openSnapshot } from '../../format/index.js';
import { parseCommand, singleFile } from '../args.js';
import { formatBytes, formatMs, makeOutput } from '../output.js';

const spec = {
  name: 'inspect',
  summary: 'Show what a snapshot file holds: its manifest (QEMU, machine, RAM blocks, disks, timings).',
  usage: 'qsnap inspect <file> [--json]',
  options: { json: { type: 'boolean' } },
  help: { json: 'print the whole manifest as JSON' },
  allowPositionals: true,
  examples: ['qsnap inspect vm.qsnap', 'qsnap inspect vm.qsnap --json | jq .disks'],
} as const;

export async function inspectCommand(argv: string[]): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  const file = singleFile('inspect', positionals);
  const out = makeOutput(values.json ?? false);
  const reader = await openSnapshot(file);
  try {
    const m = reader.manifest;
    out.result({ ok: true, file: reader.path, fileBytes: reader.fileLength, manifest: m });
    out.text(`file      ${reader.path} (${formatBytes(reader.fileLength)})`);
    out.text(`id        ${m.id}`);
    const view = (m.mappedRam?.prefix.length ?? 0) > 0;
    out.text(`format    ${m.version}${view ? ' (QEMU ≥ 9.0 loads it itself: mapped-ram)' : ''}`);
    out.text(`taken     ${m.pointInTime.wallClock} (${m.strategy}), guest was ${m.vm.runStateBefore}`);
    out.text(
      `QEMU      ${m.qemu.version.major}.${m.qemu.version.minor}.${m.qemu.version.micro}, machine ${m.qemu.machine}${m.qemu.accel ? `, ${m.qemu.accel}` : ''}`,
    );
    out.text(
      `RAM       ${formatBytes(m.vm.ramBytes)}; ${m.counts.pagesWritten} data pages, ${m.counts.zeroPages} zero pages`,
    );
    for (const b of m.ram.blocks) {
      out.text(
        `  ${b.name.padEnd(24)} ${formatBytes(b.usedLength).padStart(10)} at ${b.fileOffset}  data ${b.dataPages}, zero ${b.zeroPages}`,
      );
    }
    out.text(
      `devices   ${m.stream.devices?.length ?? 0} device sections, ${formatBytes(m.stream.deviceTail.length)} of device state`,
    );
    for (const d of m.disks)
      out.text(`disk      ${d.device} (${d.format}, ${formatBytes(d.virtualSize)}): ${d.frozenFile}`);
    for (const d of m.skippedDisks) out.text(`disk      ${d.device}: not in the snapshot (${d.reason})`);
    out.text(
      `timings   downtime ${formatMs(m.timings.downtimeMs)}, total ${formatMs(m.timings.totalMs)}, stream ${formatMs(m.timings.streamMs)}`,
    );
    return 0;
  } finally {
    await reader.close();
  }
}
