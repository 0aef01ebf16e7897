/**
 * VmSpec: defaults, and refusals that Vm.launch turns into QSNAP_VM_SPEC before it starts
 * anything (no QEMU, no temp directory).
 */
import { describe, expect, it } from 'vitest';
import { Vm } from '../../src/vm/launcher.js';
import { DiskSpec, VmSpec } from '../../src/vm/spec.js';
import { failure } from '../support/errors.js';
import { killPid } from '../support/process.js';
import { withPrivateTmpdir } from './helpers.js';

describe('VmSpec defaults', () => {
  it('fills every default of an empty spec', () => {
    expect(VmSpec.parse({})).toEqual({
      qemuBinary: 'qemu-system-x86_64',
      machine: 'pc',
      memoryMiB: 256,
      cpus: 1,
      accel: 'auto',
      disks: [],
      serial: {},
      paused: false,
      extraArgs: [],
    });
  });

  it('fills disk and memory backend defaults', () => {
    expect(DiskSpec.parse({ file: '/d.qcow2' })).toEqual({
      file: '/d.qcow2',
      format: 'qcow2',
      readOnly: false,
      bus: 'virtio',
    });
    expect(VmSpec.parse({ memoryBackend: { file: '/m' } }).memoryBackend).toEqual({
      file: '/m',
      share: false,
      readOnly: false,
    });
  });

  it('accepts serial: none and a full spec', () => {
    const spec = VmSpec.parse({
      name: 'x',
      memoryMiB: 16,
      cpus: 4,
      accel: 'tcg',
      disks: [{ file: '/a', format: 'raw', nodeName: 'root.0_a-b', readOnly: true, bus: 'scsi' }],
      serial: 'none',
      incoming: 'defer',
      paused: true,
      extraArgs: ['-S'],
    });
    expect(spec.serial).toBe('none');
    expect(spec.disks[0]?.nodeName).toBe('root.0_a-b');
  });
});

describe('VmSpec refusals', () => {
  const bad: [string, unknown, (string | number)[]][] = [
    ['an unknown key', { memory: 512 }, []],
    ['too little memory', { memoryMiB: 8 }, ['memoryMiB']],
    ['fractional memory', { memoryMiB: 100.5 }, ['memoryMiB']],
    ['zero CPUs', { cpus: 0 }, ['cpus']],
    ['an unknown accelerator', { accel: 'hvf' }, ['accel']],
    ['a disk without a file', { disks: [{ file: '' }] }, ['disks', 0, 'file']],
    ['an unknown disk format', { disks: [{ file: '/a', format: 'vmdk' }] }, ['disks', 0, 'format']],
    ['a node name QEMU would refuse', { disks: [{ file: '/a', nodeName: '1st' }] }, ['disks', 0, 'nodeName']],
    ['an unknown bus', { disks: [{ file: '/a', bus: 'nvme' }] }, ['disks', 0, 'bus']],
    ['an unknown key in a disk', { disks: [{ file: '/a', cache: 'none' }] }, ['disks', 0]],
    ['a memory backend without a file', { memoryBackend: { share: true } }, ['memoryBackend', 'file']],
    ['extra arguments that are not strings', { extraArgs: ['-m', 64] }, ['extraArgs', 1]],
  ];

  it.each(bad)('refuses %s', (_what, input, path) => {
    const result = VmSpec.safeParse(input);
    expect(result.success).toBe(false);
    expect(result.error?.issues.map((i) => i.path)).toContainEqual(path);
  });

  it('Vm.launch refuses a bad spec with QSNAP_VM_SPEC before it starts anything', async () => {
    const { result, error, leftovers } = await withPrivateTmpdir(() =>
      // A binary that does not exist: were the spec not checked first, this would be QSNAP_VM_NO_QEMU.
      Vm.launch({ memoryMiB: 8, disks: [{ file: '/a', nodeName: '1st' }], qemuBinary: '/nonexistent/qemu' }),
    );
    await killPid(result?.pid);
    expect((error as { code?: string }).code).toBe('QSNAP_VM_SPEC');
    const details = (error as { details: { issues: { path: unknown[] }[] } }).details;
    expect(details.issues.map((i) => i.path)).toEqual([['memoryMiB'], ['disks', 0, 'nodeName']]);
    expect((error as { hint?: string }).hint).toBeTruthy();
    expect(leftovers).toEqual([]);
  });

  it('the same launch with the spec fixed gets as far as looking for QEMU (control)', async () => {
    const { result, error, leftovers } = await withPrivateTmpdir(() =>
      Vm.launch({ memoryMiB: 64, qemuBinary: '/nonexistent/qemu' }),
    );
    await killPid(result?.pid);
    expect((error as { code?: string }).code).toBe('QSNAP_VM_NO_QEMU');
    expect(leftovers).toEqual([]);
  });

  it('a rejection is a VmError carrying the code in its JSON form', async () => {
    const err = await failure(Vm.launch({ cpus: -1 }));
    expect(err.name).toBe('VmError');
    expect((err as unknown as { toJSON(): { code: string } }).toJSON().code).toBe('QSNAP_VM_SPEC');
  });
});
