// Pure functions over the API's groups list and group status: where a lens lives on each
// replica, and how long switching to it should take (DESIGN §Serving shape, Tiers).

export const TIERS = ["device", "host", "disk", "failed"];

/** {group, lens} for a lens id, or null. */
export function findLens(groups, lensId) {
  for (const group of groups || []) {
    for (const lens of group.lenses) if (lens.lens_id === lensId) return { group, lens };
  }
  return null;
}

/**
 * Where a lens is, per running replica, and overall (device > host > failed > disk).
 * `status` is `GET /groups/{id}/status` (it knows failures); without it the groups list's
 * residency is used.
 */
export function residencyOf(group, lens, status) {
  const replicas = [];
  if (status && Array.isArray(status.replicas)) {
    for (const replica of status.replicas) {
      const held = replica.lenses || {};
      let tier = "disk";
      let reason = null;
      if ((held.device || []).includes(lens.lens_id)) tier = "device";
      else if ((held.host || []).includes(lens.lens_id)) tier = "host";
      else if (held.failed && lens.lens_id in held.failed) {
        tier = "failed";
        reason = held.failed[lens.lens_id];
      }
      replicas.push({ replicaId: replica.replica_id, device: replica.device, tier, reason });
    }
  } else {
    for (const place of lens.residency || []) {
      replicas.push({ replicaId: place.replica_id, device: null, tier: place.tier, reason: null });
    }
  }
  let tier = "disk";
  for (const best of ["device", "host", "failed"]) {
    if (replicas.some((r) => r.tier === best)) {
      tier = best;
      break;
    }
  }
  const reason = replicas.find((r) => r.tier === "failed")?.reason ?? null;
  return { tier, reason, replicas };
}

/**
 * The expected switch for a lens: {kind, seconds, source}. kind: "ready" (on a device),
 * "host", "disk", "cold" (the group has no running replica) or "failed".
 */
export function switchEstimate(group, residency) {
  const est = group.estimated_switch_seconds || {};
  const sourceOf = (kind) => (est.sources && est.sources[kind]) || est.source || "estimated";
  if (residency.tier === "device") return { kind: "ready", seconds: 0, source: "measured" };
  if (residency.tier === "failed") return { kind: "failed", seconds: est.disk, source: sourceOf("disk") };
  if (!group.replicas_running) return { kind: "cold", seconds: est.cold, source: sourceOf("cold") };
  if (residency.tier === "host") return { kind: "host", seconds: est.host, source: sourceOf("host") };
  return { kind: "disk", seconds: est.disk, source: sourceOf("disk") };
}

/** Lenses of a group that are on a device of some replica, and how many lenses it has. */
export function loadedCount(group, status) {
  const visible = group.lenses.filter((lens) => lens.visible !== false);
  const onDevice = visible.filter((lens) => residencyOf(group, lens, status).tier === "device");
  return { loaded: onDevice.length, total: visible.length };
}
