import { QsnapError } from '../errors.js';

/**
 * Errors of the bundled test guest, host side.
 *
 *   QsnapError              src/errors.ts
 *   └── GuestError
 *       ├── GuestImageError      QSNAP_GUEST_IMAGE     the test guest is not built
 *       ├── GuestConsoleError    QSNAP_GUEST_CONSOLE   cannot connect, disconnected, closed
 *       ├── GuestTimeoutError    QSNAP_GUEST_TIMEOUT   no matching line in time
 *       └── GuestProtocolError   QSNAP_GUEST_PROTOCOL  the workload answered QSNAP-ERROR or died
 */
export abstract class GuestError extends QsnapError {}

export class GuestImageError extends GuestError {
  constructor(imageDir: string) {
    super('QSNAP_GUEST_IMAGE', `the test guest is not built (${imageDir})`, {
      // The package ships the recipe, not Debian's kernel: it is built once where it is used.
      hint: `run make image in a checkout, or bash ${imageDir}/../../scripts/build-image.sh where qsnap is installed`,
    });
  }
}

export class GuestConsoleError extends GuestError {
  constructor(message: string, options: { cause?: unknown; details?: Record<string, unknown> } = {}) {
    super('QSNAP_GUEST_CONSOLE', message, {
      hint: 'check that QEMU runs with the serial chardev socket and that no other client holds it',
      ...options,
    });
  }
}

export class GuestTimeoutError extends GuestError {
  constructor(message: string, options: { cause?: unknown; details?: Record<string, unknown> } = {}) {
    super('QSNAP_GUEST_TIMEOUT', message, {
      hint: 'is the guest running the qsnap workload? read the chardev logfile for its console',
      ...options,
    });
  }
}

export class GuestProtocolError extends GuestError {
  constructor(message: string, details: Record<string, unknown>) {
    super('QSNAP_GUEST_PROTOCOL', message, {
      hint: 'the guest workload refused the command; see details.line',
      details,
    });
  }
}
