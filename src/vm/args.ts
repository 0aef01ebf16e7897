import { join } from 'node:path';
import { type Accel, accelArgs } from './accel.js';
import { opts } from './qemu-opts.js';
import type { ResolvedVmSpec } from './spec.js';

export interface BuiltArgv {
  argv: string[];
  qmpPath: string;
  serial: { socket: string; log: string } | undefined;
}

/** Turn a validated spec into a QEMU argv (without the binary). */
export function buildArgv(spec: ResolvedVmSpec, context: { runDir: string; accel: Accel }): BuiltArgv {
  const { runDir } = context;
  const qmpPath = spec.qmp ?? join(runDir, 'qmp.sock');
  const argv: string[] = ['-nodefaults', '-no-user-config', '-display', 'none', '-vga', 'std'];
  if (spec.name) argv.push('-name', spec.name);
  argv.push(...accelArgs(context.accel));
  argv.push('-smp', String(spec.cpus), '-m', `${spec.memoryMiB}M`);

  let machine = spec.machine;
  if (spec.memoryBackend) {
    // The backend id becomes the RAM block name; `pc.ram` keeps it identical to a VM without one.
    argv.push(
      '-object',
      opts(
        {
          id: 'pc.ram',
          size: `${spec.memoryMiB}M`,
          'mem-path': spec.memoryBackend.file,
          share: spec.memoryBackend.share,
          ...(spec.memoryBackend.readOnly ? { readonly: true } : {}),
        },
        'memory-backend-file',
      ),
    );
    machine = `${machine},memory-backend=pc.ram`;
  }
  argv.push('-machine', machine);

  if (spec.kernel) argv.push('-kernel', spec.kernel);
  if (spec.initrd) argv.push('-initrd', spec.initrd);
  if (spec.append) argv.push('-append', spec.append);

  spec.disks.forEach((disk, index) => {
    const node = disk.nodeName ?? `disk${index}`;
    argv.push(
      '-blockdev',
      opts({ driver: 'file', filename: disk.file, 'node-name': `${node}-file`, 'read-only': disk.readOnly }),
      '-blockdev',
      opts({ driver: disk.format, file: `${node}-file`, 'node-name': node, 'read-only': disk.readOnly }),
    );
    const device = disk.bus === 'virtio' ? 'virtio-blk-pci' : disk.bus === 'ide' ? 'ide-hd' : 'scsi-hd';
    argv.push('-device', opts({ drive: node, id: `${node}-dev` }, device));
  });

  argv.push('-qmp', opts({ server: true, wait: false }, `unix:${qmpPath}`));

  let serial: BuiltArgv['serial'];
  if (spec.serial !== 'none') {
    serial = {
      socket: spec.serial.socket ?? join(runDir, 'serial.sock'),
      log: spec.serial.log ?? join(runDir, 'serial.log'),
    };
    argv.push(
      '-chardev',
      opts(
        {
          id: 'serial0',
          path: serial.socket,
          server: true,
          wait: false,
          logfile: serial.log,
          logappend: true,
        },
        'socket',
      ),
      '-serial',
      'chardev:serial0',
    );
  }
  if (spec.incoming) argv.push('-incoming', spec.incoming);
  if (spec.paused) argv.push('-S');
  argv.push(...spec.extraArgs);
  return { argv, qmpPath, serial };
}
