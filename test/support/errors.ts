/** Expecting a failure: the error itself, for assertions on its code, message and details. */

/**
 * What a failure threw: an Error with qsnap's `code`, and whatever other fields it carries
 * (`details`, `hint`, `reason`, …) for assertions to read.
 */
// biome-ignore lint/suspicious/noExplicitAny: tests read and cast free-form error fields
export type Failure = Error & { code?: string } & Record<string, any>;

/**
 * Rejects the test if `fn` does not throw (or the promise resolves), or throws `undefined`;
 * returns what it threw (for `expect(err.code)`, `expect(err).toMatchObject(…)`).
 */
export async function failure(fn: Promise<unknown> | (() => Promise<unknown>)): Promise<Failure> {
  try {
    await (typeof fn === 'function' ? fn() : fn);
  } catch (err) {
    if (err === undefined) throw new Error('expected a failure, but it threw undefined');
    return err as Failure;
  }
  throw new Error('expected a failure, but it succeeded');
}
