/**
 * What preflight refuses before anything is touched, from what the probe saw. The real-QEMU
 * side (an emulated NVMe disk, QEMU's -snapshot) is in test/compat/setups.test.ts; VFIO needs
 * a host device to pass through, so its refusal is proven here from the device list alone.
 */
import { describe, expect, it } from 'vitest';
import type { DiskInfo, VmInfo } from '../../src/engine/probe.js';
import { preflight } from '../../src/engine/snapshot/preflight.js';
import { failure } from '../support/errors.js';

function disk(over: Partial<DiskInfo> = {}): DiskInfo {
  return {
    device: 'disk0-dev',
    qdev: '/machine/peripheral/disk0-dev/virtio-backend',
    nodeName: 'disk0',
    file: '/vm/disk.qcow2',
    format: 'qcow2',
    virtualSize: 2 ** 30,
    backingFile: undefined,
    chain: ['/vm/disk.qcow2'],
    readOnly: false,
    removable: false,
    inserted: true,
    temporary: false,
    ...over,
  };
}

function vm(over: Partial<VmInfo> = {}): VmInfo {
  return {
    qemu: { version: { major: 7, minor: 2, micro: 0 }, package: '', text: '7.2.0' },
    machine: 'pc-i440fx-7.2',
    runState: 'running',
    running: true,
    ramBytes: 256 * 2 ** 20,
    accel: 'kvm',
    name: undefined,
    migrationStatus: undefined,
    migrationBlockers: [],
    disks: [disk()],
    deviceTypes: ['virtio-blk-pci'],
    ...over,
  };
}

async function refusal(info: VmInfo) {
  return failure(async () => preflight(info));
}

describe('preflight', () => {
  it('lets an ordinary running VM through, as a background snapshot', () => {
    expect(preflight(vm())).toBe('background-snapshot');
  });

  it('refuses a VFIO passthrough device, naming it', async () => {
    const err = await refusal(vm({ deviceTypes: ['virtio-blk-pci', 'vfio-pci'] }));
    expect(err.code).toBe('QSNAP_SNAPSHOT_UNSUPPORTED');
    expect(err.message).toContain('vfio-pci');
    expect(err.details).toMatchObject({ devices: ['vfio-pci'] });
  });

  it('refuses whatever QEMU says blocks a migration, in QEMU’s words', async () => {
    const reason =
      "Migration is disabled when VirtFS export path '/srv' is mounted in the guest using mount_tag 'share'";
    const err = await refusal(vm({ migrationBlockers: [reason] }));
    expect(err.code).toBe('QSNAP_SNAPSHOT_UNSUPPORTED');
    expect(err.message).toContain(reason);
    expect(err.details).toMatchObject({ blockers: [reason] });
  });

  it('refuses a disk on QEMU’s temporary -snapshot overlay, naming the disk', async () => {
    const err = await refusal(vm({ disks: [disk(), disk({ device: 'virtio1', temporary: true })] }));
    expect(err.code).toBe('QSNAP_SNAPSHOT_UNSUPPORTED');
    expect(err.details).toMatchObject({ disks: ['virtio1'] });
  });
});
