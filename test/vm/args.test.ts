/**
 * buildArgv: a validated spec → QEMU argv. Read back with splitArgv/parseQemuOpts, so the
 * assertions are about what QEMU will see, not about string layout. (The launcher tests run
 * such argvs, commas in paths included, on the real QEMU.)
 */
import { describe, expect, it } from 'vitest';
import { buildArgv } from '../../src/vm/args.js';
import { getOpt, parseQemuOpts, splitArgv } from '../../src/vm/qemu-opts.js';
import { VmSpec } from '../../src/vm/spec.js';

const RUN_DIR = '/run/qsnap-test';

function build(input: VmSpec, accel: 'tcg' | 'kvm' = 'tcg') {
  return buildArgv(VmSpec.parse(input), { runDir: RUN_DIR, accel });
}

/** Values of every occurrence of `option`, in order. */
function values(argv: string[], option: string): string[] {
  return splitArgv(argv)
    .filter((e) => e.option === option)
    .map((e) => e.value ?? '');
}

function only(argv: string[], option: string): string {
  const found = values(argv, option);
  expect(found, option).toHaveLength(1);
  return found[0]!;
}

function hasFlag(argv: string[], flag: string): boolean {
  return splitArgv(argv).some((e) => e.option === flag && e.value === undefined);
}

describe('buildArgv: machine, CPU, memory', () => {
  it('builds a default VM: TCG, pc, 256 MiB, one CPU, no default devices', () => {
    const { argv } = build({});
    expect(only(argv, '-accel')).toBe('tcg');
    expect(values(argv, '-cpu')).toEqual([]);
    expect(only(argv, '-machine')).toBe('pc');
    expect(only(argv, '-m')).toBe('256M');
    expect(only(argv, '-smp')).toBe('1');
    expect(hasFlag(argv, '-nodefaults')).toBe(true);
    expect(only(argv, '-display')).toBe('none');
    expect(hasFlag(argv, '-S')).toBe(false);
    expect(values(argv, '-incoming')).toEqual([]);
  });

  it('passes the host CPU through under KVM', () => {
    const { argv } = build({}, 'kvm');
    expect(only(argv, '-accel')).toBe('kvm');
    expect(only(argv, '-cpu')).toBe('host');
  });

  it('sets name, CPUs, memory, machine and the kernel boot triple', () => {
    const { argv } = build({
      name: 'vm-a',
      cpus: 2,
      memoryMiB: 512,
      machine: 'q35',
      kernel: '/k/vmlinuz',
      initrd: '/k/initrd',
      append: 'console=ttyS0 quiet',
    });
    expect(only(argv, '-name')).toBe('vm-a');
    expect(only(argv, '-smp')).toBe('2');
    expect(only(argv, '-m')).toBe('512M');
    expect(only(argv, '-machine')).toBe('q35');
    expect(only(argv, '-kernel')).toBe('/k/vmlinuz');
    expect(only(argv, '-initrd')).toBe('/k/initrd');
    expect(only(argv, '-append')).toBe('console=ttyS0 quiet');
  });

  it('backs RAM with a file as the pc.ram block and points the machine at it', () => {
    const { argv } = build({ memoryMiB: 128, memoryBackend: { file: '/dev/shm/a,b', share: true } });
    const object = parseQemuOpts(only(argv, '-object'), 'qom-type');
    expect(object.implied).toBe('memory-backend-file');
    expect(getOpt(object, 'id')).toBe('pc.ram');
    expect(getOpt(object, 'size')).toBe('128M');
    expect(getOpt(object, 'mem-path')).toBe('/dev/shm/a,b');
    expect(getOpt(object, 'share')).toBe('on');
    expect(getOpt(object, 'readonly')).toBeUndefined();
    const machine = parseQemuOpts(only(argv, '-machine'), 'type');
    expect(machine.implied).toBe('pc');
    expect(getOpt(machine, 'memory-backend')).toBe('pc.ram');
  });

  it('maps a private read-only backend to share=off,readonly=on', () => {
    const { argv } = build({ memoryBackend: { file: '/m', readOnly: true } });
    const object = parseQemuOpts(only(argv, '-object'), 'qom-type');
    expect(getOpt(object, 'share')).toBe('off');
    expect(getOpt(object, 'readonly')).toBe('on');
  });

  it('has no -object and a plain machine without a memory backend', () => {
    const { argv } = build({ machine: 'pc' });
    expect(values(argv, '-object')).toEqual([]);
    expect(getOpt(parseQemuOpts(only(argv, '-machine'), 'type'), 'memory-backend')).toBeUndefined();
  });
});

describe('buildArgv: disks', () => {
  const spec: VmSpec = {
    disks: [
      { file: '/img/root,1.qcow2' },
      { file: '/img/data.raw', format: 'raw', nodeName: 'data', readOnly: true, bus: 'ide' },
      { file: '/img/s.qcow2', bus: 'scsi' },
    ],
  };

  it('gives each disk a file node and a format node named after it', () => {
    const blockdevs = values(build(spec).argv, '-blockdev').map((v) => parseQemuOpts(v));
    const nodes = blockdevs.map((o) => ({
      driver: getOpt(o, 'driver'),
      node: getOpt(o, 'node-name'),
      filename: getOpt(o, 'filename'),
      file: getOpt(o, 'file'),
      readOnly: getOpt(o, 'read-only'),
    }));
    expect(nodes).toEqual([
      { driver: 'file', node: 'disk0-file', filename: '/img/root,1.qcow2', file: undefined, readOnly: 'off' },
      { driver: 'qcow2', node: 'disk0', filename: undefined, file: 'disk0-file', readOnly: 'off' },
      { driver: 'file', node: 'data-file', filename: '/img/data.raw', file: undefined, readOnly: 'on' },
      { driver: 'raw', node: 'data', filename: undefined, file: 'data-file', readOnly: 'on' },
      { driver: 'file', node: 'disk2-file', filename: '/img/s.qcow2', file: undefined, readOnly: 'off' },
      { driver: 'qcow2', node: 'disk2', filename: undefined, file: 'disk2-file', readOnly: 'off' },
    ]);
  });

  it('escapes a comma in a disk path', () => {
    expect(values(build(spec).argv, '-blockdev')[0]).toContain('filename=/img/root,,1.qcow2,');
  });

  it('attaches each format node to a device of its bus', () => {
    const devices = values(build(spec).argv, '-device').map((v) => parseQemuOpts(v, 'driver'));
    expect(devices.map((d) => [d.implied, getOpt(d, 'drive'), getOpt(d, 'id')])).toEqual([
      ['virtio-blk-pci', 'disk0', 'disk0-dev'],
      ['ide-hd', 'data', 'data-dev'],
      ['scsi-hd', 'disk2', 'disk2-dev'],
    ]);
  });

  it('has no block options without disks', () => {
    const { argv } = build({});
    expect(values(argv, '-blockdev')).toEqual([]);
    expect(values(argv, '-device')).toEqual([]);
  });
});

describe('buildArgv: monitor, serial, incoming, extra arguments', () => {
  it('opens QMP and a logged serial socket in the run directory by default', () => {
    const built = build({});
    expect(built.qmpPath).toBe(`${RUN_DIR}/qmp.sock`);
    const qmp = parseQemuOpts(only(built.argv, '-qmp'), 'path');
    expect(qmp.implied).toBe(`unix:${RUN_DIR}/qmp.sock`);
    expect(getOpt(qmp, 'server')).toBe('on');
    expect(getOpt(qmp, 'wait')).toBe('off');

    expect(built.serial).toEqual({ socket: `${RUN_DIR}/serial.sock`, log: `${RUN_DIR}/serial.log` });
    const chardev = parseQemuOpts(only(built.argv, '-chardev'), 'backend');
    expect(chardev.implied).toBe('socket');
    expect(getOpt(chardev, 'id')).toBe('serial0');
    expect(getOpt(chardev, 'path')).toBe(`${RUN_DIR}/serial.sock`);
    expect(getOpt(chardev, 'logfile')).toBe(`${RUN_DIR}/serial.log`);
    expect(getOpt(chardev, 'server')).toBe('on');
    expect(getOpt(chardev, 'wait')).toBe('off');
    expect(only(built.argv, '-serial')).toBe('chardev:serial0');
  });

  it('uses the given QMP path and serial paths, commas escaped', () => {
    const built = build({ qmp: '/s/q,1.sock', serial: { socket: '/s/ser,1.sock', log: '/s/ser.log' } });
    expect(built.qmpPath).toBe('/s/q,1.sock');
    expect(parseQemuOpts(only(built.argv, '-qmp'), 'path').implied).toBe('unix:/s/q,1.sock');
    expect(built.serial).toEqual({ socket: '/s/ser,1.sock', log: '/s/ser.log' });
    expect(getOpt(parseQemuOpts(only(built.argv, '-chardev'), 'backend'), 'path')).toBe('/s/ser,1.sock');
  });

  it('has no serial port with serial: none', () => {
    const built = build({ serial: 'none' });
    expect(built.serial).toBeUndefined();
    expect(values(built.argv, '-serial')).toEqual([]);
    expect(values(built.argv, '-chardev')).toEqual([]);
  });

  it('adds -incoming and -S when asked', () => {
    const { argv } = build({ incoming: 'defer', paused: true });
    expect(only(argv, '-incoming')).toBe('defer');
    expect(hasFlag(argv, '-S')).toBe(true);
  });

  it('appends extra arguments last, unchanged', () => {
    const extra = ['-no-reboot', '-device', 'virtio-rng-pci', '-usb'];
    const { argv } = build({ extraArgs: extra });
    expect(argv.slice(-extra.length)).toEqual(extra);
  });
});
