import type { Manifest } from '../../format/index.js';
import type { ParsedCommandLine } from '../../vm/cmdline.js';
import { RestoreError } from '../errors.js';
import { ramSizeError } from './incoming.js';

/** Devices that discard guest RAM, which on QEMU < 8.2 punches holes in a privately mapped file. */
export const RAM_DISCARDING_DEVICES = /^virtio-(balloon|mem)/;

/**
 * A lazy restore maps the main RAM block privately from the snapshot file: refused where that
 * is unsafe (devices that discard RAM) or cannot work (another RAM size — QEMU would fail with
 * a start-up error only — or a file whose main block is not at offset 0).
 */
export function checkLazy(parsed: ParsedCommandLine, manifest: Manifest): void {
  refuseUnsafeLazy(parsed, manifest.stream.devices ?? []);
  if (parsed.ramBytes !== undefined && parsed.ramBytes !== manifest.vm.ramBytes)
    throw ramSizeError(parsed.ramBytes, manifest.vm.ramBytes);
  if (manifest.ram.blocks[0]?.fileOffset !== 0) {
    throw new RestoreError('QSNAP_RESTORE_FORMAT', 'the main RAM block is not at offset 0 of the file', {
      hint: 'restore without --lazy',
    });
  }
}

export function refuseUnsafeLazy(parsed: ParsedCommandLine, devicesInSnapshot: string[]): void {
  const discarding = [...parsed.deviceTypes, ...devicesInSnapshot].filter((t) =>
    RAM_DISCARDING_DEVICES.test(t),
  );
  if (discarding.length) {
    throw new RestoreError(
      'QSNAP_RESTORE_LAZY_UNSAFE',
      `lazy restore is unsafe with ${[...new Set(discarding)].join(', ')}: RAM discards would punch holes in the snapshot file`,
      { hint: 'restore without --lazy (full restore), or remove the balloon/virtio-mem device' },
    );
  }
}
