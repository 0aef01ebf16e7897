/**
 * resolveAccel: explicit choices and the QSNAP_ACCEL override with a fake environment, then
 * `auto` on this machine, whose /dev/kvm is a PVM hypervisor that hangs stock guests.
 */
import { constants, existsSync } from 'node:fs';
import { access } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { accelArgs, isKvmStartupFailure, requestsKvm, resolveAccel } from '../../src/vm/accel.js';

const isPvmHost = existsSync('/sys/module/kvm_pvm');

async function kvmUsable(): Promise<boolean> {
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

describe('resolveAccel with a fake environment', () => {
  it('keeps an explicit choice without probing or reading the environment', async () => {
    expect(await resolveAccel('tcg', { QSNAP_ACCEL: 'kvm' })).toEqual({ accel: 'tcg', reason: 'requested' });
    expect(await resolveAccel('kvm', { QSNAP_ACCEL: 'tcg' })).toEqual({ accel: 'kvm', reason: 'requested' });
  });

  it('lets QSNAP_ACCEL force either accelerator for auto', async () => {
    expect(await resolveAccel('auto', { QSNAP_ACCEL: 'kvm' })).toEqual({
      accel: 'kvm',
      reason: 'QSNAP_ACCEL',
    });
    expect(await resolveAccel('auto', { QSNAP_ACCEL: 'tcg' })).toEqual({
      accel: 'tcg',
      reason: 'QSNAP_ACCEL',
    });
  });

  it.each(['KVM', 'xen', '', 'kvm '])('ignores QSNAP_ACCEL=%j and probes', async (value) => {
    const probed = await resolveAccel('auto', {});
    expect(await resolveAccel('auto', { QSNAP_ACCEL: value })).toEqual(probed);
    expect(probed.reason).not.toBe('QSNAP_ACCEL');
  });
});

describe('resolveAccel on this machine', () => {
  it('agrees with the machine facts', async () => {
    const decision = await resolveAccel('auto', {});
    const expected = !(await kvmUsable()) ? 'tcg' : isPvmHost ? 'tcg' : 'kvm';
    expect(decision.accel).toBe(expected);
  });

  it.runIf(isPvmHost)('answers TCG on this PVM host, naming PVM as the reason', async () => {
    const decision = await resolveAccel('auto', {});
    expect(decision.accel).toBe('tcg');
    // With /dev/kvm usable, PVM is the only thing that can turn auto into TCG here.
    if (await kvmUsable()) expect(decision.reason).toMatch(/kvm_pvm/);
  });

  it.runIf(isPvmHost)('still lets QSNAP_ACCEL=kvm force KVM on the PVM host', async () => {
    expect((await resolveAccel('auto', { QSNAP_ACCEL: 'kvm' })).accel).toBe('kvm');
  });
});

describe('accelArgs', () => {
  it('passes the host CPU under KVM and keeps the default CPU model under TCG', () => {
    expect(accelArgs('kvm')).toEqual(['-accel', 'kvm', '-cpu', 'host']);
    expect(accelArgs('tcg')).toEqual(['-accel', 'tcg']);
  });
});

describe('a QEMU that could not use KVM (QSNAP_VM_ACCEL)', () => {
  it('recognises every way a command line asks for KVM, and nothing else', () => {
    expect(requestsKvm(['-accel', 'kvm'])).toBe(true);
    expect(requestsKvm(['-accel', 'kvm,kernel-irqchip=split'])).toBe(true);
    expect(requestsKvm(['-enable-kvm'])).toBe(true);
    expect(requestsKvm(['-machine', 'q35,accel=kvm'])).toBe(true);
    expect(requestsKvm(['-M', 'pc,accel=kvm:tcg'])).toBe(true);
    expect(requestsKvm(['-accel', 'tcg'])).toBe(false);
    expect(requestsKvm(['-machine', 'q35', '-name', 'kvm'])).toBe(false);
    expect(requestsKvm(['-drive', 'file=kvm.qcow2'])).toBe(false);
  });

  it('blames KVM only when KVM was asked for and QEMU named it', () => {
    const said =
      'Could not access KVM kernel module: Permission denied | qemu-system-x86_64: failed to initialize kvm: Permission denied';
    expect(isKvmStartupFailure(['-accel', 'kvm'], said)).toBe(true);
    // Negative controls: the same words without KVM asked for, KVM asked for and another failure.
    expect(isKvmStartupFailure(['-accel', 'tcg'], said)).toBe(false);
    expect(
      isKvmStartupFailure(['-accel', 'kvm'], "qemu-system-x86_64: -drive file=x: Could not open 'x'"),
    ).toBe(false);
  });
});
