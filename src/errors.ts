/**
 * The root of every error qsnap raises on purpose.
 *
 * Each error carries a stable `code` (tests and scripts match on it, never on the
 * message), a one-line `message` saying what failed, and a `hint` saying what to do.
 * `toJSON()` gives the structured form that `--json` prints and the daemon will send.
 * docs/errors.md has the one table of every code.
 *
 * The tree (each family documents its codes next to its code):
 *
 *   QsnapError                       QSNAP_INTERNAL (an unexpected error, wrapped by asQsnapError)
 *   ├── QmpError                     src/qmp/errors.ts       QSNAP_QMP_*
 *   ├── VmError                      src/vm/errors.ts        QSNAP_VM_*
 *   ├── StreamError                  src/stream/errors.ts    QSNAP_STREAM_*
 *   ├── SnapshotFileError            src/format/errors.ts    QSNAP_FILE_*
 *   ├── GuestError                   src/guest/errors.ts     QSNAP_GUEST_*
 *   ├── SnapshotError                src/engine/errors.ts    QSNAP_SNAPSHOT_*
 *   ├── RestoreError                 src/engine/errors.ts    QSNAP_RESTORE_*
 *   ├── ExportError                  src/engine/errors.ts    QSNAP_EXPORT_*
 *   ├── VerifyError                  src/engine/errors.ts    QSNAP_VERIFY_*
 *   ├── StoreError                   src/store/errors.ts     QSNAP_STORE_*
 *   ├── MachineError                 src/harness/errors.ts   QSNAP_MACHINE_*
 *   └── UsageError                   src/cli/args.ts         QSNAP_USAGE
 */
export interface QsnapErrorOptions {
  hint?: string;
  cause?: unknown;
  details?: Record<string, unknown>;
}

/** `C` narrows the code to a family's own codes, so a family can only throw what it documents. */
export class QsnapError<C extends string = string> extends Error {
  readonly code: C;
  readonly hint: string | undefined;
  readonly details: Record<string, unknown>;

  constructor(code: C, message: string, options: QsnapErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.hint = options.hint;
    this.details = options.details ?? {};
  }

  /** One line for a terminal: what failed, then what to do. */
  toLine(): string {
    return this.hint ? `${this.message} — ${this.hint}` : this.message;
  }

  toJSON(): QsnapErrorJson {
    const cause = this.cause;
    return {
      code: this.code,
      message: this.message,
      ...(this.hint ? { hint: this.hint } : {}),
      ...(Object.keys(this.details).length ? { details: this.details } : {}),
      ...(cause instanceof QsnapError
        ? { cause: cause.toJSON() }
        : cause instanceof Error
          ? { cause: { code: (cause as NodeJS.ErrnoException).code ?? cause.name, message: cause.message } }
          : {}),
    };
  }
}

export interface QsnapErrorJson {
  code: string;
  message: string;
  hint?: string;
  details?: Record<string, unknown>;
  cause?: QsnapErrorJson | { code: string; message: string };
}

/** Anything thrown, as a QsnapError (unknown errors keep their cause under QSNAP_INTERNAL). */
export function asQsnapError(err: unknown): QsnapError {
  if (err instanceof QsnapError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new QsnapError('QSNAP_INTERNAL', `internal error: ${message}`, {
    hint: 'this is a bug in qsnap; please report it with the command you ran',
    cause: err,
  });
}
