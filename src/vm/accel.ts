import { constants, existsSync } from 'node:fs';
import { access } from 'node:fs/promises';

export type Accel = 'kvm' | 'tcg';

export interface AccelDecision {
  accel: Accel;
  /** Why this accelerator was chosen, for status output and logs. */
  reason: string;
}

/**
 * Resolve `auto` to an accelerator that really runs a guest.
 *
 * KVM is chosen only when /dev/kvm can be opened for read and write and the host is not
 * a KVM flavour known to accept ioctls yet hang stock guests: under the PVM hypervisor
 * (kvm_pvm module) QEMU reports KVM enabled, real-mode code runs, and a Linux guest then
 * hangs silently (shared/qemu-notes.md). Probing with real-mode code would pass wrongly,
 * so the module is the test. `QSNAP_ACCEL=kvm|tcg` overrides the decision.
 */
export async function resolveAccel(
  requested: 'auto' | Accel,
  env: NodeJS.ProcessEnv = process.env,
): Promise<AccelDecision> {
  if (requested !== 'auto') return { accel: requested, reason: 'requested' };
  const forced = env['QSNAP_ACCEL'];
  if (forced === 'kvm' || forced === 'tcg') return { accel: forced, reason: 'QSNAP_ACCEL' };
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return { accel: 'tcg', reason: '/dev/kvm is missing or not accessible' };
  }
  if (existsSync('/sys/module/kvm_pvm')) {
    return { accel: 'tcg', reason: 'PVM hypervisor (kvm_pvm) cannot run a stock guest kernel' };
  }
  return { accel: 'kvm', reason: '/dev/kvm is usable' };
}

/** QEMU arguments for an accelerator: KVM passes the host CPU through, TCG keeps QEMU's default model. */
export function accelArgs(accel: Accel): string[] {
  return accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg'];
}

/** Whether a command line asks for KVM (`-accel kvm`, `-enable-kvm`, `-machine accel=kvm`). */
export function requestsKvm(argv: readonly string[]): boolean {
  return argv.some(
    (arg, i) =>
      arg === '-enable-kvm' ||
      ((argv[i - 1] === '-accel' || argv[i - 1] === '-machine' || argv[i - 1] === '-M') &&
        /(^|,|accel=|:)kvm(,|:|$)/.test(arg)),
  );
}

/**
 * A QEMU that exited during start-up failed because of KVM when it asked for KVM and said so
 * (7.2: "Could not access KVM kernel module", "failed to initialize kvm"; accel/kvm/kvm-all.c).
 */
export function isKvmStartupFailure(argv: readonly string[], log: string): boolean {
  return requestsKvm(argv) && /\bkvm\b/i.test(log);
}
