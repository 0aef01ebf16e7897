import { basename, dirname, extname, join, resolve } from 'node:path';

/**
 * The one naming rule for the qcow2 overlays qsnap creates: `<stem>.<kind>-<tag>.qcow2`, in
 * `dir` or beside the image. `qsnap-<tag>` is the live overlay a snapshot puts under a running
 * VM (the tag is the snapshot id's first 8 hex digits), `restore-<tag>` the overlay a restored
 * VM writes to. The stem is the original image's name with every earlier qsnap suffix removed:
 * along a chain of snapshots and restores the names would otherwise outgrow NAME_MAX.
 */
export type OverlayKind = 'qsnap' | 'restore';

const EARLIER_SUFFIXES = /(\.(?:qsnap|restore)-[0-9a-f]{8})+$/;
const OVERLAY_NAME = /\.(qsnap|restore)-[0-9a-f]{8}\.qcow2$/;

export function overlayPath(image: string, kind: OverlayKind, tag: string, dir?: string): string {
  const file = resolve(image);
  const stem = basename(file, extname(file)).replace(EARLIER_SUFFIXES, '');
  return join(dir ? resolve(dir) : dirname(file), `${stem}.${kind}-${tag}.qcow2`);
}

/** The kind of overlay `file` is by its name, or undefined when qsnap did not name it. */
export function overlayKind(file: string): OverlayKind | undefined {
  return OVERLAY_NAME.exec(file)?.[1] as OverlayKind | undefined;
}
