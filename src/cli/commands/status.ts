import { resolve } from 'node:path';
import { connectVm } from '../../engine/connect.js';
import { probeVm, type VmInfo } from '../../engine/probe.js';
import { parseCommand, UsageError } from '../args.js';
import { withDaemon } from '../daemon.js';
import type { CliEnv } from '../env.js';
import { formatBytes, makeOutput, type Output } from '../output.js';

const spec = {
  name: 'status',
  summary: 'Show a running VM: run state, QEMU version, machine type, RAM and block devices.',
  usage: 'qsnap status --qmp <socket> [--json]',
  options: {
    qmp: { type: 'string' },
    json: { type: 'boolean' },
  },
  help: {
    qmp: "the VM's QMP socket (unix path, or host:port)",
    json: 'print one JSON object instead of text',
  },
  examples: [
    'qsnap status --qmp /run/vm/qmp.sock',
    'qsnap status --qmp /run/vm/qmp.sock --json | jq .runState',
  ],
} as const;

export async function statusCommand(argv: string[], env: CliEnv): Promise<number> {
  const parsed = parseCommand(spec, argv);
  if (!parsed) return 0;
  const { values } = parsed;
  if (!values.qmp) throw new UsageError('status: --qmp <socket> is required', 'see qsnap status --help');
  const out = makeOutput(values.json ?? false);
  if (env.daemonUrl) {
    const qmpPath = resolve(values.qmp);
    const r = await withDaemon(env, async (c) => c.status({ vm: (await c.attach({ qmp: qmpPath })).vm }));
    out.result({ ok: true, qmp: values.qmp, ...(r['info'] as VmInfo), vm: r.vm });
    printStatus(r['info'] as VmInfo, out);
    return 0;
  }
  const { qmp, recovery } = await connectVm(values.qmp, { stateDir: env.stateDir });
  try {
    const vm = await probeVm(qmp);
    out.result({ ok: true, qmp: values.qmp, ...vm, recovery: recovery.recovered ? recovery : undefined });
    if (recovery.recovered)
      out.text(`recovered an interrupted qsnap operation: ${recovery.actions.join('; ')}`);
    printStatus(vm, out);
    return 0;
  } finally {
    await qmp.close();
  }
}

function printStatus(vm: VmInfo, out: Output): void {
  out.text(`state     ${vm.runState}`);
  out.text(`QEMU      ${vm.qemu.text} (${vm.qemu.package.trim() || 'upstream'})`);
  out.text(`machine   ${vm.machine}, accel ${vm.accel}${vm.name ? `, name ${vm.name}` : ''}`);
  out.text(`RAM       ${formatBytes(vm.ramBytes)}`);
  out.text(`disks     ${vm.disks.length === 0 ? 'none' : ''}`);
  for (const d of vm.disks) {
    const access = !d.inserted ? 'empty' : d.readOnly ? 'read-only' : 'read-write';
    out.text(
      `  ${d.device.padEnd(12)} node ${String(d.nodeName ?? '-').padEnd(14)} ${String(d.format ?? '-').padEnd(6)} ${access.padEnd(10)} ${d.file ?? ''}${d.removable ? ' (removable)' : ''}`,
    );
  }
}
