import { join } from 'node:path';
import { type Accel, accelArgs } from './accel.js';
import { opts } from './qemu-opts.js';
import type { DiskSpec, ResolvedVmSpec } from './spec.js';

export interface BuiltArgv {
  argv: string[];
  qmpPath: string;
  serial: { socket: string; log: string } | undefined;
}

/** Turn a validated spec into a QEMU argv (without the binary). */
export function buildArgv(spec: ResolvedVmSpec, context: { runDir: string; accel: Accel }): BuiltArgv {
  const { runDir } = context;
  const qmpPath = spec.qmp ?? join(runDir, 'qmp.sock');
  const serial = serialPaths(spec.serial, runDir);
  const argv: string[] = ['-nodefaults', '-no-user-config', '-display', 'none', '-vga', 'std'];
  if (spec.name) argv.push('-name', spec.name);
  argv.push(...accelArgs(context.accel));
  argv.push('-smp', String(spec.cpus), '-m', `${spec.memoryMiB}M`);
  argv.push(...machineArgs(spec));
  if (spec.kernel) argv.push('-kernel', spec.kernel);
  if (spec.initrd) argv.push('-initrd', spec.initrd);
  if (spec.append) argv.push('-append', spec.append);
  spec.disks.forEach((disk, index) => {
    argv.push(...diskArgs(disk, index));
  });
  argv.push('-qmp', opts({ server: true, wait: false }, `unix:${qmpPath}`));
  if (serial) argv.push(...serialArgs(serial));
  if (spec.incoming) argv.push('-incoming', spec.incoming);
  if (spec.paused) argv.push('-S');
  argv.push(...spec.extraArgs);
  return { argv, qmpPath, serial };
}

/** `-machine`, preceded by the memory backend object when guest RAM is backed by a file. */
function machineArgs(spec: ResolvedVmSpec): string[] {
  if (!spec.memoryBackend) return ['-machine', spec.machine];
  // The backend id becomes the RAM block name; `pc.ram` keeps it identical to a VM without one.
  return [
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
    '-machine',
    `${spec.machine},memory-backend=pc.ram`,
  ];
}

/** A file node, a format node on it named `nodeName` (default `disk<index>`), and the device. */
function diskArgs(disk: DiskSpec, index: number): string[] {
  const node = disk.nodeName ?? `disk${index}`;
  const device = disk.bus === 'virtio' ? 'virtio-blk-pci' : disk.bus === 'ide' ? 'ide-hd' : 'scsi-hd';
  return [
    '-blockdev',
    opts({ driver: 'file', filename: disk.file, 'node-name': `${node}-file`, 'read-only': disk.readOnly }),
    '-blockdev',
    opts({ driver: disk.format, file: `${node}-file`, 'node-name': node, 'read-only': disk.readOnly }),
    '-device',
    opts({ drive: node, id: `${node}-dev` }, device),
  ];
}

/** The serial socket and log paths, defaulting into the run directory; undefined without a serial. */
function serialPaths(serial: ResolvedVmSpec['serial'], runDir: string): BuiltArgv['serial'] {
  if (serial === 'none') return undefined;
  return {
    socket: serial.socket ?? join(runDir, 'serial.sock'),
    log: serial.log ?? join(runDir, 'serial.log'),
  };
}

/** A unix socket server chardev that also logs everything the guest prints, as the serial port. */
function serialArgs(serial: NonNullable<BuiltArgv['serial']>): string[] {
  return [
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
  ];
}
