//! When a key rotates: a `KeyRotationPolicy` spec, parsed and checked, and the
//! arithmetic on it (next rotation, key lifetime, maximum age).
//!
//! Schedules are standard 5-field cron expressions (`minute hour day-of-month
//! month day-of-week`) with names (`JAN`, `SUN`), ranges, steps, lists and the
//! `@hourly`/`@daily`/`@midnight`/`@weekly`/`@monthly`/`@yearly`/`@annually`
//! macros, read in an IANA time zone. When both day-of-month and day-of-week
//! are restricted (anything but `*` or `?`), a day matching either one
//! matches, as in Vixie cron.
//!
//! Daylight saving time: a time that falls into a spring-forward gap fires at
//! the first instant after the gap; a time repeated by a fall-back fires once,
//! at its first occurrence (or at the second, if the key was issued between
//! the two).

use std::time::Duration;

use chrono::{DateTime, LocalResult, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use jiff::{SignedDuration, Timestamp};

use crate::api::validation::{parse_duration, InvalidField};
use crate::api::KeyRotationPolicySpec;

/// Added to a key's lifetime on top of the time until its rotation and the
/// grace period, so that a rotation that runs a little late (a slow provider, a
/// busy controller, a restart) never finds the old key already expired.
pub const SAFETY_MARGIN: Duration = Duration::from_secs(10 * 60);

/// The shortest `rotateEvery` and `maxKeyAge` accepted: schedules have minute
/// granularity too, and rotating more often only hammers the provider.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// A KeyRotationPolicy spec, parsed and checked.
#[derive(Clone, Debug)]
pub struct RotationSchedule {
    every: Option<Duration>,
    cron: Option<(Cron, Tz)>,
    jitter: Duration,
    grace: Duration,
    max_key_age: Option<Duration>,
    confirm_rollout: Option<Duration>,
    dormant_after: Option<Duration>,
    disable_dormant: bool,
    revoke_unused_after: Option<Duration>,
}

impl RotationSchedule {
    /// Parses and checks `spec`. Every bad field is reported, each with its
    /// JSON path (`spec.schedule`, `spec.timeZone`, ...) and a message a user
    /// can act on.
    pub fn from_spec(spec: &KeyRotationPolicySpec) -> Result<Self, Vec<InvalidField>> {
        let mut errors = Vec::new();

        // In the order of the spec's fields.
        let every = interval(&mut errors, "spec.rotateEvery", spec.rotate_every.as_deref());
        let cron = match spec.schedule.as_deref().map(parse_cron) {
            Some(Ok(cron)) => Some(cron),
            Some(Err(message)) => {
                errors.push(InvalidField::new("spec.schedule", message));
                None
            }
            None => None,
        };
        let tz = match spec.time_zone.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                errors.push(InvalidField::new(
                    "spec.timeZone",
                    format!("{:?} is not an IANA time zone; use a name such as UTC or Europe/Berlin", spec.time_zone),
                ));
                None
            }
        };
        let jitter = duration(&mut errors, "spec.jitter", spec.jitter.as_deref()).unwrap_or_default();
        let grace = duration(&mut errors, "spec.gracePeriod", Some(&spec.grace_period)).unwrap_or_default();
        let max_key_age = interval(&mut errors, "spec.maxKeyAge", spec.max_key_age.as_deref());
        let confirm_rollout = spec
            .confirm_rollout
            .as_ref()
            .and_then(|c| duration(&mut errors, "spec.confirmRollout.maxWait", Some(&c.max_wait)));
        if spec.confirm_rollout.is_some() && spec.restart_targets.is_empty() {
            errors.push(InvalidField::new(
                "spec.confirmRollout",
                "confirmRollout waits for restartTargets to roll out; list at least one restart target",
            ));
        }

        let dormant_after = duration(&mut errors, "spec.dormantAfter", spec.dormant_after.as_deref());
        if spec.disable_dormant && spec.dormant_after.is_none() {
            errors.push(InvalidField::new(
                "spec.disableDormant",
                "disableDormant disables accounts unused for dormantAfter; set dormantAfter too",
            ));
        }
        let revoke_unused_after = duration(&mut errors, "spec.revokeUnusedAfter", spec.revoke_unused_after.as_deref());

        if spec.rotate_every.is_none() && spec.schedule.is_none() {
            errors.push(InvalidField::new("spec", "set rotateEvery, schedule, or both"));
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            every,
            // A time zone error was reported above, so `tz` is set here.
            cron: cron.zip(tz),
            jitter,
            grace,
            max_key_age,
            confirm_rollout,
            dormant_after,
            disable_dormant: spec.disable_dormant,
            revoke_unused_after,
        })
    }

    /// After how long without use an account is dormant, if the policy says.
    pub fn dormant_after(&self) -> Option<Duration> {
        self.dormant_after
    }

    /// Whether a dormant account is disabled in the target app.
    pub fn disable_dormant(&self) -> bool {
        self.disable_dormant
    }

    /// After how long unused a replaced key is revoked early, if the policy
    /// says.
    pub fn revoke_unused_after(&self) -> Option<Duration> {
        self.revoke_unused_after
    }

    /// With confirmed rollover, the longest a replaced key stays valid
    /// after the new one is published while its rollout is not complete.
    pub fn confirm_rollout(&self) -> Option<Duration> {
        self.confirm_rollout
    }

    /// How long a replaced key stays valid after the new one is published.
    pub fn grace_period(&self) -> Duration {
        self.grace
    }

    /// When a key issued at `issued_at` is due for rotation: the earliest of
    /// `issued_at + rotateEvery` and the first schedule time after
    /// `issued_at` (in the time zone), plus a jitter in `[0, jitter)`, in whole
    /// seconds, that depends only on `seed` (so repeated reconciles agree),
    /// capped at `issued_at + maxKeyAge`. Saturates at [`Timestamp::MAX`]
    /// rather than overflowing.
    pub fn next_rotation(&self, issued_at: Timestamp, seed: &str) -> Timestamp {
        let by_interval = self.every.map(|every| saturating_add(issued_at, every));
        let by_schedule =
            self.cron.as_ref().map(|(cron, tz)| next_cron_time(cron, tz, issued_at).unwrap_or(Timestamp::MAX));
        let due = match (by_interval, by_schedule) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => Timestamp::MAX,
        };
        let due = saturating_add(due, jitter_offset(seed, self.jitter));
        match self.max_key_age {
            Some(max) => due.min(saturating_add(issued_at, max)),
            None => due,
        }
    }

    /// How long a new key must live, for providers whose keys expire: from
    /// `now` until its rotation is due, plus the grace period, plus
    /// [`SAFETY_MARGIN`].
    pub fn key_lifetime(&self, now: Timestamp, next_rotation: Timestamp) -> Duration {
        let until_rotation = Duration::try_from(next_rotation.duration_since(now)).unwrap_or(Duration::ZERO);
        until_rotation.saturating_add(self.grace).saturating_add(SAFETY_MARGIN)
    }

    /// Whether a key issued at `issued_at` is older than `maxKeyAge` at `now`.
    /// Always false without a `maxKeyAge`.
    pub fn key_too_old(&self, issued_at: Timestamp, now: Timestamp) -> bool {
        let Some(max) = self.max_key_age else {
            return false;
        };
        Duration::try_from(now.duration_since(issued_at)).is_ok_and(|age| age > max)
    }
}

/// Parses an optional duration field, recording an error if it is invalid.
fn duration(errors: &mut Vec<InvalidField>, field: &str, text: Option<&str>) -> Option<Duration> {
    match parse_duration(field, text?) {
        Ok(d) => Some(d),
        Err(e) => {
            errors.push(e);
            None
        }
    }
}

/// Like [`duration`], for intervals, which must be at least [`MIN_INTERVAL`].
fn interval(errors: &mut Vec<InvalidField>, field: &str, text: Option<&str>) -> Option<Duration> {
    let d = duration(errors, field, text)?;
    if d < MIN_INTERVAL {
        errors.push(InvalidField::new(field, format!("{:?} is too short; use at least 1m", text.unwrap_or_default())));
        return None;
    }
    Some(d)
}

/// `ts + d`, or [`Timestamp::MAX`] if that is out of range.
fn saturating_add(ts: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d).ok().and_then(|d| ts.checked_add(d).ok()).unwrap_or(Timestamp::MAX)
}

/// The whole Unix second `ts` falls in (rounding down, also before 1970).
fn unix_second_floor(ts: Timestamp) -> i64 {
    let second = ts.as_second();
    if ts.subsec_nanosecond() < 0 {
        second.saturating_sub(1)
    } else {
        second
    }
}

/// The first time `cron` fires in `tz` strictly after `after`, or `None` if
/// there is none in the range croner searches (through the year 5000).
fn next_cron_time(cron: &Cron, tz: &Tz, after: Timestamp) -> Option<Timestamp> {
    let after = DateTime::<Utc>::from_timestamp(unix_second_floor(after), 0)?;
    let mut from = after.with_timezone(tz);
    // croner searches in local wall-clock time. When `after` is in the second
    // pass of a fall-back hour, it can answer with the first pass of a wall
    // time, which is before `after`; then the second pass is the answer. The
    // loop is bounded: each round moves forward in wall-clock time.
    for _ in 0..4 {
        let candidate = cron.find_next_occurrence(&from, false).ok()?;
        let utc = candidate.with_timezone(&Utc);
        if utc > after {
            return Timestamp::from_second(utc.timestamp()).ok();
        }
        if let LocalResult::Ambiguous(_, later) = tz.from_local_datetime(&candidate.naive_local()) {
            let later = later.with_timezone(&Utc);
            if later > after {
                return Timestamp::from_second(later.timestamp()).ok();
            }
        }
        from = candidate;
    }
    None
}

/// A delay in `[0, jitter)`, in whole seconds, that depends only on `seed`.
fn jitter_offset(seed: &str, jitter: Duration) -> Duration {
    // The number of whole seconds strictly below `jitter`.
    let choices = jitter.as_secs().saturating_add(u64::from(jitter.subsec_nanos() > 0));
    if choices <= 1 {
        return Duration::ZERO;
    }
    // Multiply-shift maps the hash onto [0, choices), with negligible bias.
    let scaled = (u128::from(stable_hash(seed)) * u128::from(choices)) >> 64;
    Duration::from_secs(u64::try_from(scaled).unwrap_or(0))
}

/// FNV-1a (64-bit) followed by the MurmurHash3 finalizer, which spreads
/// FNV's weak high bits. Fixed forever: changing it moves every account's
/// rotation time. (std's `DefaultHasher` may change between Rust releases.)
fn stable_hash(seed: &str) -> u64 {
    let mut hash = fnv1a64(seed.as_bytes());
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    hash
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME))
}

/// One of the five fields of a cron expression.
struct CronField {
    /// What users call it, in messages.
    name: &'static str,
    min: u32,
    max: u32,
    /// Three-letter names, for `names[i]` standing for `names_from + i`.
    names: &'static [&'static str],
    names_from: u32,
    /// An example name, for messages.
    example: &'static str,
}

const MINUTE: CronField = CronField { name: "minute", min: 0, max: 59, names: &[], names_from: 0, example: "" };
const HOUR: CronField = CronField { name: "hour", min: 0, max: 23, names: &[], names_from: 0, example: "" };
const DAY_OF_MONTH: CronField =
    CronField { name: "day of month", min: 1, max: 31, names: &[], names_from: 0, example: "" };
const MONTH: CronField = CronField {
    name: "month",
    min: 1,
    max: 12,
    names: &["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"],
    names_from: 1,
    example: "JAN",
};
const DAY_OF_WEEK: CronField = CronField {
    name: "day of week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    names_from: 0,
    example: "MON",
};

/// A field, parsed: whether it was `*` (or `?`), and the values it selects
/// as a bit set.
struct Selection {
    star: bool,
    bits: u64,
}

impl Selection {
    fn contains(&self, value: u32) -> bool {
        value < 64 && self.bits & (1 << value) != 0
    }

    fn values(&self) -> impl Iterator<Item = u32> + '_ {
        (0..64).filter(|v| self.contains(*v))
    }

    /// The field as croner reads it: `*`, or a plain list of numbers.
    fn render(&self) -> String {
        if self.star {
            return "*".to_owned();
        }
        self.values().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
    }
}

/// Parses a cron expression into a croner schedule, or explains what is
/// wrong with it. Checked here rather than by croner, for messages that name
/// the field and value, and to refuse croner's extensions (seconds, `L`, `W`,
/// `#`) so that schedules stay portable.
fn parse_cron(expr: &str) -> Result<Cron, String> {
    let trimmed = expr.trim();
    if trimmed.is_empty() {
        return Err(
            "the schedule is empty; use 5 fields (minute hour day-of-month month day-of-week), such as \"0 3 * * SUN\", or a macro such as @daily"
                .to_owned(),
        );
    }
    let expanded = if trimmed.starts_with('@') {
        match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            _ => {
                return Err(format!(
                    "{expr:?} is not a supported macro; use @hourly, @daily, @midnight, @weekly, @monthly, @yearly or @annually"
                ))
            }
        }
    } else {
        trimmed
    };

    let parts: Vec<&str> = expanded.split_whitespace().collect();
    let [minute, hour, dom, month, dow] = parts.as_slice() else {
        let hint = if parts.len() == 6 { " (a seconds field is not supported)" } else { "" };
        return Err(format!(
            "{expr:?} has {} fields{hint}; a schedule has 5: minute hour day-of-month month day-of-week, such as \"0 3 * * SUN\"",
            parts.len()
        ));
    };

    let at = |e: String| format!("{expr:?}: {e}");
    let minute = parse_field(minute, &MINUTE).map_err(at)?;
    let hour = parse_field(hour, &HOUR).map_err(at)?;
    let dom = parse_field(dom, &DAY_OF_MONTH).map_err(at)?;
    let month = parse_field(month, &MONTH).map_err(at)?;
    let mut dow = parse_field(dow, &DAY_OF_WEEK).map_err(at)?;
    // 7 is Sunday too.
    if dow.contains(7) {
        dow.bits = (dow.bits & !(1 << 7)) | 1;
    }

    // With day-of-week `*`, a day must be one of the days of month in one of
    // the months: "30 2" (February 30th) never happens. (With both
    // restricted, either matches, and every weekday occurs in every month.)
    if dow.star && !dom.star {
        let possible = month.values().any(|m| dom.values().any(|d| d <= days_in_month(m)));
        if !possible {
            return Err(format!(
                "{expr:?} never occurs: none of the months it selects has any of the days of month it selects"
            ));
        }
    }

    let normalized = [&minute, &hour, &dom, &month, &dow].map(Selection::render).join(" ");
    let cron = Cron::new(&normalized).parse().map_err(|e| format!("{expr:?} is not a valid schedule: {e}"))?;
    // A backstop for the check above: the schedule must fire at some point.
    let reference = DateTime::<Utc>::from_timestamp(946_684_800, 0); // 2000-01-01
    if reference.is_none_or(|r| cron.find_next_occurrence(&r, false).is_err()) {
        return Err(format!("{expr:?} never occurs"));
    }
    Ok(cron)
}

/// The most days month `month` (1-12) can have, in any year.
fn days_in_month(month: u32) -> u32 {
    match month {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses one field: `*`, or a comma-separated list of `value`,
/// `value-value`, each optionally followed by `/step`, or `*/step`. `?` is `*`
/// in the two day fields.
fn parse_field(text: &str, field: &CronField) -> Result<Selection, String> {
    let name = field.name;
    let is_day_field = field.name == DAY_OF_MONTH.name || field.name == DAY_OF_WEEK.name;
    if text == "*" || (text == "?" && is_day_field) {
        return Ok(Selection { star: true, bits: range_bits(field.min, field.max, 1) });
    }
    let mut bits = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(format!("{name} {text:?} has an empty list item"));
        }
        let (range, step_text) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let step = match step_text {
            None => 1,
            Some(step) => match step.parse::<u32>() {
                Ok(0) => return Err(format!("{name} step in {item:?} must be at least 1")),
                Ok(step) => step,
                Err(_) => {
                    let unit = if is_day_field { "day" } else { name };
                    return Err(format!("{name} step in {item:?} is not a number of {unit}s"));
                }
            },
        };
        let (first, last) = if range == "*" {
            (field.min, field.max)
        } else if let Some((from, to)) = range.split_once('-') {
            let from = parse_value(from, field)?;
            let mut to = parse_value(to, field)?;
            // SUN ends a week: FRI-SUN is 5-7.
            if field.name == DAY_OF_WEEK.name && to == 0 && from > 0 {
                to = 7;
            }
            if from > to {
                return Err(format!("{name} range {range:?} runs backwards; write the smaller value first"));
            }
            (from, to)
        } else {
            let value = parse_value(range, field)?;
            // `5/15` means from 5 to the end, every 15.
            let last = if step_text.is_some() { field.max } else { value };
            (value, last)
        };
        bits |= range_bits(first, last, step);
    }
    Ok(Selection { star: false, bits })
}

/// The bits `first`, `first + step`, ... up to `last`.
fn range_bits(first: u32, last: u32, step: u32) -> u64 {
    let mut bits = 0u64;
    let mut value = first;
    while value <= last && value < 64 {
        bits |= 1 << value;
        match value.checked_add(step) {
            Some(next) => value = next,
            None => break,
        }
    }
    bits
}

/// Parses a number or a name in `field`'s range.
fn parse_value(text: &str, field: &CronField) -> Result<u32, String> {
    let name = field.name;
    let (min, max) = (field.min, field.max);
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u32>() {
            Ok(value) if (min..=max).contains(&value) => Ok(value),
            _ => Err(format!(
                "{name} {text} is out of range (use {min}-{max}{})",
                match (field.names.first(), field.names.last()) {
                    (Some(first), Some(last)) => format!(" or {first}-{last}"),
                    _ => String::new(),
                }
            )),
        };
    }
    if let Some(index) = field.names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        // At most 12 names, so the index fits.
        return Ok(field.names_from + u32::try_from(index).unwrap_or(0));
    }
    if text.is_empty() {
        return Err(format!("{name} has an empty value"));
    }
    if field.names.is_empty() {
        Err(format!("{name} {text:?} is not a number"))
    } else {
        Err(format!("{name} {text:?} is not a number or a name such as {}", field.example))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn spec(json: serde_json::Value) -> KeyRotationPolicySpec {
        serde_json::from_value(json).unwrap()
    }

    fn schedule(json: serde_json::Value) -> RotationSchedule {
        RotationSchedule::from_spec(&spec(json)).unwrap()
    }

    fn errors(json: serde_json::Value) -> Vec<InvalidField> {
        RotationSchedule::from_spec(&spec(json)).unwrap_err()
    }

    /// The single error for `json`, as `field: message`.
    fn error(json: serde_json::Value) -> String {
        let errors = errors(json);
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].to_string()
    }

    #[test]
    fn confirmed_rollover_needs_restart_targets_and_a_duration() {
        let targets = serde_json::json!([{"kind": "Deployment", "name": "app"}]);
        let ok = schedule(serde_json::json!({"rotateEvery": "1h", "restartTargets": targets, "confirmRollout": {}}));
        assert_eq!(ok.confirm_rollout(), Some(Duration::from_secs(1800)), "maxWait defaults to 30m");
        assert_eq!(schedule(serde_json::json!({"rotateEvery": "1h"})).confirm_rollout(), None);
        assert_eq!(
            error(serde_json::json!({"rotateEvery": "1h", "confirmRollout": {"maxWait": "5m"}})),
            "spec.confirmRollout: confirmRollout waits for restartTargets to roll out; list at least one restart target"
        );
        let bad = error(
            serde_json::json!({"rotateEvery": "1h", "restartTargets": targets, "confirmRollout": {"maxWait": "soon"}}),
        );
        assert!(bad.starts_with("spec.confirmRollout.maxWait"), "{bad}");
    }

    /// The next rotation without jitter for a schedule in a time zone.
    fn next(cron: &str, tz: &str, issued_at: &str) -> Timestamp {
        schedule(serde_json::json!({"schedule": cron, "timeZone": tz})).next_rotation(ts(issued_at), "seed")
    }

    /// The first `n` rotations, each issued at the previous one.
    fn chain(cron: &str, tz: &str, start: &str, n: usize) -> Vec<Timestamp> {
        let s = schedule(serde_json::json!({"schedule": cron, "timeZone": tz}));
        let mut at = ts(start);
        (0..n)
            .map(|_| {
                let next = s.next_rotation(at, "seed");
                assert!(next > at, "{next} is not after {at}");
                at = next;
                next
            })
            .collect()
    }

    #[test]
    fn interval_only() {
        let s = schedule(serde_json::json!({"rotateEvery": "720h"}));
        assert_eq!(s.next_rotation(ts("2025-01-01T00:00:00Z"), "a"), ts("2025-01-31T00:00:00Z"));
        let s = schedule(serde_json::json!({"rotateEvery": "1h30m"}));
        assert_eq!(s.next_rotation(ts("2025-01-01T00:00:00.5Z"), "a"), ts("2025-01-01T01:30:00.5Z"));
    }

    #[test]
    fn cron_only_utc() {
        assert_eq!(next("0 3 * * *", "UTC", "2025-01-01T05:00:00Z"), ts("2025-01-02T03:00:00Z"));
        assert_eq!(next("0 3 * * *", "UTC", "2025-01-01T02:59:59Z"), ts("2025-01-01T03:00:00Z"));
    }

    #[test]
    fn time_zone_defaults_to_utc() {
        let s = schedule(serde_json::json!({"schedule": "0 3 * * *"}));
        assert_eq!(s.next_rotation(ts("2025-01-01T05:00:00Z"), "x"), ts("2025-01-02T03:00:00Z"));
    }

    #[test]
    fn cron_time_is_strictly_after_issue() {
        assert_eq!(next("0 3 * * *", "UTC", "2025-01-01T03:00:00Z"), ts("2025-01-02T03:00:00Z"));
        // Sub-second issue times, after and before the epoch.
        assert_eq!(next("0 3 * * *", "UTC", "2025-01-01T03:00:00.999Z"), ts("2025-01-02T03:00:00Z"));
        assert_eq!(next("0 3 * * *", "UTC", "2025-01-01T02:59:59.999Z"), ts("2025-01-01T03:00:00Z"));
        assert_eq!(next("* * * * *", "UTC", "1969-12-31T23:59:59.5Z"), ts("1970-01-01T00:00:00Z"));
    }

    #[test]
    fn interval_and_cron_earliest_wins() {
        let s = schedule(serde_json::json!({"rotateEvery": "24h", "schedule": "0 3 * * *"}));
        // The schedule comes first.
        assert_eq!(s.next_rotation(ts("2025-01-01T00:00:00Z"), "a"), ts("2025-01-01T03:00:00Z"));
        let s = schedule(serde_json::json!({"rotateEvery": "1h", "schedule": "0 3 * * *"}));
        // The interval comes first.
        assert_eq!(s.next_rotation(ts("2025-01-01T00:00:00Z"), "a"), ts("2025-01-01T01:00:00Z"));
        let s = schedule(
            serde_json::json!({"rotateEvery": "720h", "schedule": "0 3 * * SUN", "timeZone": "Europe/Berlin"}),
        );
        assert_eq!(s.next_rotation(ts("2025-01-01T00:00:00Z"), "a"), ts("2025-01-05T02:00:00Z"));
    }

    #[test]
    fn sunday_in_berlin_summer_and_winter() {
        // 03:00 CEST (UTC+2) is 01:00 UTC; 03:00 CET (UTC+1) is 02:00 UTC.
        let summer = next("0 3 * * SUN", "Europe/Berlin", "2025-07-01T00:00:00Z");
        assert_eq!(summer, ts("2025-07-06T01:00:00Z"));
        let winter = next("0 3 * * SUN", "Europe/Berlin", "2025-01-01T00:00:00Z");
        assert_eq!(winter, ts("2025-01-05T02:00:00Z"));
        for t in [summer, winter] {
            let local = t.in_tz("Europe/Berlin").unwrap();
            assert_eq!(local.weekday(), jiff::civil::Weekday::Sunday);
            assert_eq!((local.hour(), local.minute()), (3, 0));
        }
        // Weekly across both changes of 2025, always Sunday 03:00 local.
        let times = chain("0 3 * * SUN", "Europe/Berlin", "2025-01-01T00:00:00Z", 60);
        for t in &times {
            let local = t.in_tz("Europe/Berlin").unwrap();
            assert_eq!(local.weekday(), jiff::civil::Weekday::Sunday, "{t}");
            assert_eq!((local.hour(), local.minute()), (3, 0), "{t}");
        }
        assert!(times.contains(&ts("2025-03-30T01:00:00Z")));
        assert!(times.contains(&ts("2025-10-26T02:00:00Z")));
    }

    #[test]
    fn spring_forward_gap_fires_once_after_the_gap() {
        // 2025-03-30 in Berlin: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
        assert_eq!(next("30 2 * * *", "Europe/Berlin", "2025-03-29T12:00:00Z"), ts("2025-03-30T01:00:00Z"));
        let times = chain("30 2 * * *", "Europe/Berlin", "2025-03-28T12:00:00Z", 4);
        assert_eq!(
            times,
            [
                ts("2025-03-29T01:30:00Z"), // 02:30 CET
                ts("2025-03-30T01:00:00Z"), // 03:00 CEST, just after the gap
                ts("2025-03-31T00:30:00Z"), // 02:30 CEST
                ts("2025-04-01T00:30:00Z"),
            ]
        );
        // Every 15 minutes across the gap: no loop, no repeats.
        let times = chain("*/15 * * * *", "Europe/Berlin", "2025-03-30T00:00:00Z", 8);
        assert_eq!(times[0], ts("2025-03-30T00:15:00Z"));
        assert_eq!(times[3], ts("2025-03-30T01:00:00Z"));
        assert_eq!(times[7], ts("2025-03-30T02:00:00Z"));
    }

    #[test]
    fn fall_back_repeated_hour_fires_once() {
        // 2025-10-26 in Berlin: 03:00 CEST falls back to 02:00 CET; 02:30
        // happens at 00:30 UTC and again at 01:30 UTC.
        let times = chain("30 2 * * *", "Europe/Berlin", "2025-10-25T12:00:00Z", 3);
        assert_eq!(times, [ts("2025-10-26T00:30:00Z"), ts("2025-10-27T01:30:00Z"), ts("2025-10-28T01:30:00Z"),]);
        // Issued between the two passes of 02:30: the second one is next.
        assert_eq!(next("30 2 * * *", "Europe/Berlin", "2025-10-26T01:10:00Z"), ts("2025-10-26T01:30:00Z"));
        // Every 15 minutes through the repeated hour: strictly increasing.
        let times = chain("*/15 * * * *", "Europe/Berlin", "2025-10-26T00:00:00Z", 12);
        assert!(times.windows(2).all(|w| w[0] < w[1]));
        assert!(times.iter().all(|t| t.as_second() % 900 == 0));
        // Issued in the second pass of 02:xx, the next quarter is 15 minutes on.
        assert_eq!(next("*/15 * * * *", "Europe/Berlin", "2025-10-26T01:40:00Z"), ts("2025-10-26T01:45:00Z"));
    }

    #[test]
    fn other_time_zones() {
        // New York: 09:00 EST is 14:00 UTC, 09:00 EDT is 13:00 UTC.
        assert_eq!(next("0 9 * * MON-FRI", "America/New_York", "2025-01-04T00:00:00Z"), ts("2025-01-06T14:00:00Z"));
        assert_eq!(next("0 9 * * MON-FRI", "America/New_York", "2025-07-05T00:00:00Z"), ts("2025-07-07T13:00:00Z"));
        // Kolkata has a half-hour offset and no DST.
        assert_eq!(next("0 0 * * *", "Asia/Kolkata", "2025-01-01T00:00:00Z"), ts("2025-01-01T18:30:00Z"));
    }

    #[test]
    fn cron_syntax() {
        let at = "2025-01-01T00:00:00Z"; // a Wednesday
        let cases = [
            ("@hourly", "2025-01-01T01:00:00Z"),
            ("@daily", "2025-01-02T00:00:00Z"),
            ("@midnight", "2025-01-02T00:00:00Z"),
            ("@weekly", "2025-01-05T00:00:00Z"),
            ("@monthly", "2025-02-01T00:00:00Z"),
            ("@yearly", "2026-01-01T00:00:00Z"),
            ("@annually", "2026-01-01T00:00:00Z"),
            ("@DAILY", "2025-01-02T00:00:00Z"),
            (" 0 3 * * SUN ", "2025-01-05T03:00:00Z"),
            ("0 3 * * sun", "2025-01-05T03:00:00Z"),
            ("0 3 * * 0", "2025-01-05T03:00:00Z"),
            ("0 3 * * 7", "2025-01-05T03:00:00Z"),
            ("0 3 ? * SUN", "2025-01-05T03:00:00Z"),
            ("0 3 * * MON", "2025-01-06T03:00:00Z"),
            ("0 3 * * FRI-SUN", "2025-01-03T03:00:00Z"),
            ("0 3 * * SAT-SUN", "2025-01-04T03:00:00Z"),
            ("0 3 * * 6-7", "2025-01-04T03:00:00Z"),
            ("0 0 * * MON,WED", "2025-01-06T00:00:00Z"),
            ("0 0 1 JUL *", "2025-07-01T00:00:00Z"),
            ("0 0 1 jan-mar,jul *", "2025-02-01T00:00:00Z"),
            ("0 0 1 */4 *", "2025-05-01T00:00:00Z"),
            ("*/20 9-17 * * *", "2025-01-01T09:00:00Z"),
            ("10-50/20 * * * *", "2025-01-01T00:10:00Z"),
            ("45/10 * * * *", "2025-01-01T00:45:00Z"),
            ("5,35 */6 * * *", "2025-01-01T00:05:00Z"),
            ("0 0 29 2 *", "2028-02-29T00:00:00Z"),
            ("0 0 31 * *", "2025-01-31T00:00:00Z"),
            // Day of month and day of week both restricted: either matches.
            ("0 0 15 * FRI", "2025-01-03T00:00:00Z"),
            ("0 0 2 * SUN", "2025-01-02T00:00:00Z"),
        ];
        for (cron, want) in cases {
            assert_eq!(next(cron, "UTC", at), ts(want), "{cron}");
        }
        // `*/4` in hours, and the step from a single value.
        let times = chain("0 */4 * * *", "UTC", at, 6);
        let hours: Vec<i8> = times.iter().map(|t| t.in_tz("UTC").unwrap().hour()).collect();
        assert_eq!(hours, [4, 8, 12, 16, 20, 0]);
    }

    #[test]
    fn jitter_is_deterministic_and_bounded() {
        let s = schedule(serde_json::json!({"rotateEvery": "24h", "jitter": "1h"}));
        let issued = ts("2025-01-01T00:00:00Z");
        let base = ts("2025-01-02T00:00:00Z");
        let end = ts("2025-01-02T01:00:00Z");
        let mut minutes = std::collections::BTreeSet::new();
        for i in 0..1000 {
            let seed = format!("payments/account-{i}");
            let t = s.next_rotation(issued, &seed);
            assert_eq!(t, s.next_rotation(issued, &seed), "not deterministic");
            assert!(base <= t && t < end, "{t} outside [{base}, {end})");
            assert_eq!(t.subsec_nanosecond(), 0, "jitter is in whole seconds");
            minutes.insert(t.duration_since(base).as_secs() / 60);
        }
        // Spread over (nearly) every minute of the hour.
        assert!(minutes.len() >= 55, "only {} distinct minutes", minutes.len());
        // Different seeds give different times.
        assert_ne!(s.next_rotation(issued, "a"), s.next_rotation(issued, "b"));
    }

    #[test]
    fn jitter_is_stable_across_builds() {
        // Pinned values: if these change, every account's rotation time moves.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let hour = Duration::from_secs(3600);
        let pinned = jitter_offset("payments/billing-sync", hour);
        assert_eq!(pinned, jitter_offset("payments/billing-sync", hour));
        assert_eq!(pinned, Duration::from_secs(PINNED_JITTER_SECS));
    }

    const PINNED_JITTER_SECS: u64 = 161;

    #[test]
    fn jitter_edges() {
        assert_eq!(jitter_offset("x", Duration::ZERO), Duration::ZERO);
        assert_eq!(jitter_offset("x", Duration::from_millis(900)), Duration::ZERO);
        assert_eq!(jitter_offset("x", Duration::from_secs(1)), Duration::ZERO);
        for seed in ["", "a", "b", "c", "payments/x"] {
            assert!(jitter_offset(seed, Duration::from_secs(2)) < Duration::from_secs(2));
            assert!(jitter_offset(seed, Duration::from_millis(2500)) < Duration::from_millis(2500));
            assert!(jitter_offset(seed, Duration::MAX) < Duration::MAX);
        }
        // No jitter: exactly on time.
        let s = schedule(serde_json::json!({"rotateEvery": "24h"}));
        assert_eq!(s.next_rotation(ts("2025-01-01T00:00:00Z"), "anything"), ts("2025-01-02T00:00:00Z"));
    }

    #[test]
    fn max_key_age_caps_rotation() {
        let s = schedule(serde_json::json!({"rotateEvery": "720h", "maxKeyAge": "24h"}));
        let issued = ts("2025-01-01T00:00:00Z");
        assert_eq!(s.next_rotation(issued, "a"), ts("2025-01-02T00:00:00Z"));
        // Jitter never pushes a rotation past the cap.
        let s = schedule(serde_json::json!({"rotateEvery": "23h30m", "jitter": "2h", "maxKeyAge": "24h"}));
        let cap = ts("2025-01-02T00:00:00Z");
        let mut capped = 0;
        for i in 0..200 {
            let t = s.next_rotation(issued, &format!("seed-{i}"));
            assert!(t >= ts("2025-01-01T23:30:00Z") && t <= cap, "{t}");
            capped += usize::from(t == cap);
        }
        assert!(capped > 0 && capped < 200, "capped {capped} of 200");
        // A schedule with rare times is capped too.
        let s = schedule(serde_json::json!({"schedule": "@yearly", "maxKeyAge": "2160h"}));
        assert_eq!(s.next_rotation(issued, "a"), ts("2025-04-01T00:00:00Z"));
    }

    #[test]
    fn key_lifetime_covers_grace() {
        let s = schedule(serde_json::json!({"rotateEvery": "168h", "gracePeriod": "24h"}));
        assert_eq!(s.grace_period(), Duration::from_secs(24 * 3600));
        let now = ts("2025-01-01T00:00:00Z");
        let next = s.next_rotation(now, "a");
        let lifetime = s.key_lifetime(now, next);
        assert_eq!(lifetime, Duration::from_secs(8 * 24 * 3600) + SAFETY_MARGIN);
        assert!(lifetime > Duration::from_secs(8 * 24 * 3600));
        // A rotation already overdue: the grace period and margin remain.
        assert_eq!(s.key_lifetime(ts("2025-02-01T00:00:00Z"), next), Duration::from_secs(24 * 3600) + SAFETY_MARGIN);
        // Default grace period is 1h.
        let s = schedule(serde_json::json!({"rotateEvery": "1h"}));
        assert_eq!(s.grace_period(), Duration::from_secs(3600));
        assert_eq!(s.key_lifetime(now, ts("2025-01-01T01:00:00Z")), Duration::from_secs(7200) + SAFETY_MARGIN);
    }

    #[test]
    fn key_too_old() {
        let issued = ts("2025-01-01T00:00:00Z");
        let s = schedule(serde_json::json!({"rotateEvery": "720h", "maxKeyAge": "1080h"}));
        assert!(!s.key_too_old(issued, ts("2025-01-01T00:00:00Z")));
        assert!(!s.key_too_old(issued, ts("2025-02-15T00:00:00Z"))); // exactly 45 days
        assert!(s.key_too_old(issued, ts("2025-02-15T00:00:01Z")));
        assert!(!s.key_too_old(issued, ts("2024-12-01T00:00:00Z"))); // clock skew
        let s = schedule(serde_json::json!({"rotateEvery": "720h"}));
        assert!(!s.key_too_old(issued, ts("2099-01-01T00:00:00Z")));
    }

    #[test]
    fn huge_durations_saturate() {
        let huge = "2562047788015215h"; // close to u64::MAX seconds
        let s = schedule(serde_json::json!({
            "rotateEvery": huge, "jitter": huge, "gracePeriod": huge, "maxKeyAge": huge,
        }));
        let issued = ts("2025-01-01T00:00:00Z");
        assert_eq!(s.next_rotation(issued, "a"), Timestamp::MAX);
        assert_eq!(s.next_rotation(Timestamp::MAX, "a"), Timestamp::MAX);
        let lifetime = s.key_lifetime(Timestamp::MIN, Timestamp::MAX);
        assert!(lifetime > s.grace_period());
        assert_eq!(
            RotationSchedule { grace: Duration::MAX, ..s.clone() }.key_lifetime(issued, Timestamp::MAX),
            Duration::MAX
        );
        assert!(!s.key_too_old(Timestamp::MIN, Timestamp::MAX));
        // Schedules near the end of time do not panic either.
        let s = schedule(serde_json::json!({"schedule": "0 0 29 2 *", "jitter": "1h"}));
        assert_eq!(s.next_rotation(Timestamp::MAX, "a"), Timestamp::MAX);
        let late = ts("9999-12-30T00:00:00Z");
        assert_eq!(s.next_rotation(late, "a"), Timestamp::MAX);
        let s = schedule(serde_json::json!({"schedule": "* * * * *", "timeZone": "Pacific/Kiritimati"}));
        assert!(s.next_rotation(Timestamp::MIN, "a") > Timestamp::MIN);
        assert!(s.next_rotation(late, "a") >= late);
    }

    #[test]
    fn defaults_and_valid_spec() {
        let s = schedule(serde_json::json!({
            "rotateEvery": "720h", "schedule": "0 3 * * SUN", "timeZone": "Europe/Berlin",
            "jitter": "1h", "gracePeriod": "24h", "maxKeyAge": "1080h",
        }));
        assert_eq!(s.every, Some(Duration::from_secs(720 * 3600)));
        assert_eq!(s.jitter, Duration::from_secs(3600));
        assert_eq!(s.max_key_age, Some(Duration::from_secs(1080 * 3600)));
        assert!(s.cron.is_some());
        // A zero grace period and zero jitter are fine.
        schedule(serde_json::json!({"rotateEvery": "1m", "gracePeriod": "0s", "jitter": "0s"}));
    }

    #[test]
    fn invalid_fields_name_the_field() {
        let cases = [
            (serde_json::json!({"rotateEvery": "30 days"}), "spec.rotateEvery: \"30 days\" is not a duration"),
            (serde_json::json!({"rotateEvery": "0s"}), "spec.rotateEvery: \"0s\" is too short; use at least 1m"),
            (serde_json::json!({"rotateEvery": "59s"}), "spec.rotateEvery: \"59s\" is too short"),
            (serde_json::json!({"rotateEvery": "1h", "maxKeyAge": "0s"}), "spec.maxKeyAge: \"0s\" is too short"),
            (serde_json::json!({"rotateEvery": "1h", "maxKeyAge": "45d"}), "spec.maxKeyAge: \"45d\" is not a duration"),
            (serde_json::json!({"rotateEvery": "1h", "jitter": "soon"}), "spec.jitter: \"soon\" is not a duration"),
            (
                serde_json::json!({"rotateEvery": "1h", "gracePeriod": "1d"}),
                "spec.gracePeriod: \"1d\" is not a duration",
            ),
            (
                serde_json::json!({"rotateEvery": "1h", "timeZone": "Mars/Olympus"}),
                "spec.timeZone: \"Mars/Olympus\" is not an IANA time zone",
            ),
            (
                serde_json::json!({"schedule": "0 3 * * *", "timeZone": "CEST+2"}),
                "spec.timeZone: \"CEST+2\" is not an IANA time zone",
            ),
            (serde_json::json!({"gracePeriod": "1h"}), "spec: set rotateEvery, schedule, or both"),
            (
                serde_json::json!({"schedule": "61 * * * *"}),
                "spec.schedule: \"61 * * * *\": minute 61 is out of range (use 0-59)",
            ),
            (
                serde_json::json!({"schedule": "0 24 * * *"}),
                "spec.schedule: \"0 24 * * *\": hour 24 is out of range (use 0-23)",
            ),
            (serde_json::json!({"schedule": "0 0 0 * *"}), "day of month 0 is out of range (use 1-31)"),
            (serde_json::json!({"schedule": "0 0 32 * *"}), "day of month 32 is out of range"),
            (serde_json::json!({"schedule": "0 0 * 13 *"}), "month 13 is out of range (use 1-12 or JAN-DEC)"),
            (serde_json::json!({"schedule": "0 0 * * 8"}), "day of week 8 is out of range (use 0-7 or SUN-SAT)"),
            (serde_json::json!({"schedule": "0 0 * * 99999999999999"}), "day of week 99999999999999 is out of range"),
            (
                serde_json::json!({"schedule": "0 0 * * FOO"}),
                "day of week \"FOO\" is not a number or a name such as MON",
            ),
            (
                serde_json::json!({"schedule": "0 0 * * SUNDAY"}),
                "day of week \"SUNDAY\" is not a number or a name such as MON",
            ),
            (serde_json::json!({"schedule": "0 0 * JAN-FOO *"}), "month \"FOO\" is not a number or a name such as JAN"),
            (serde_json::json!({"schedule": "0 0 * MON *"}), "month \"MON\" is not a number or a name such as JAN"),
            (serde_json::json!({"schedule": "0 0 JAN * *"}), "day of month \"JAN\" is not a number"),
            (serde_json::json!({"schedule": "x 0 * * *"}), "minute \"x\" is not a number"),
            (serde_json::json!({"schedule": "? 0 * * *"}), "minute \"?\" is not a number"),
            (serde_json::json!({"schedule": "0 0 L * *"}), "day of month \"L\" is not a number"),
            (serde_json::json!({"schedule": "0 0 * * 5#2"}), "day of week \"5#2\" is not a number"),
            (serde_json::json!({"schedule": "30-10 * * * *"}), "minute range \"30-10\" runs backwards"),
            (serde_json::json!({"schedule": "0 0 * * SAT-MON"}), "day of week range \"SAT-MON\" runs backwards"),
            (serde_json::json!({"schedule": "*/0 * * * *"}), "minute step in \"*/0\" must be at least 1"),
            (serde_json::json!({"schedule": "*/x * * * *"}), "minute step in \"*/x\" is not a number of minutes"),
            (serde_json::json!({"schedule": "0 0 */x * *"}), "day of month step in \"*/x\" is not a number of days"),
            (serde_json::json!({"schedule": "1,,2 * * * *"}), "minute \"1,,2\" has an empty list item"),
            (serde_json::json!({"schedule": "1- * * * *"}), "minute has an empty value"),
            (
                serde_json::json!({"schedule": "0 3 * *"}),
                "spec.schedule: \"0 3 * *\" has 4 fields; a schedule has 5: minute hour day-of-month month day-of-week",
            ),
            (serde_json::json!({"schedule": "0 0 3 * * *"}), "has 6 fields (a seconds field is not supported)"),
            (serde_json::json!({"schedule": ""}), "spec.schedule: the schedule is empty"),
            (serde_json::json!({"schedule": "   "}), "spec.schedule: the schedule is empty"),
            (serde_json::json!({"schedule": "@reboot"}), "spec.schedule: \"@reboot\" is not a supported macro"),
            (serde_json::json!({"schedule": "0 0 30 2 *"}), "spec.schedule: \"0 0 30 2 *\" never occurs"),
            (serde_json::json!({"schedule": "0 0 31 4,6,9,11 *"}), "\"0 0 31 4,6,9,11 *\" never occurs"),
            (serde_json::json!({"schedule": "0 0 30,31 FEB *"}), "never occurs"),
        ];
        for (json, want) in cases {
            let got = error(json.clone());
            assert!(got.contains(want), "{json}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn every_bad_field_is_reported() {
        let errors = errors(serde_json::json!({
            "rotateEvery": "30d", "schedule": "61 * * * *", "timeZone": "Mars/Olympus",
            "jitter": "-1h", "gracePeriod": "", "maxKeyAge": "forever",
        }));
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.rotateEvery", "spec.schedule", "spec.timeZone", "spec.jitter", "spec.gracePeriod", "spec.maxKeyAge",]
        );
        assert!(errors.iter().all(|e| !e.message.is_empty()));
    }

    #[test]
    fn february_30_with_a_weekday_still_occurs() {
        // Either field matches when both are restricted, so this is every Monday
        // in February.
        assert_eq!(next("0 0 30 2 MON", "UTC", "2025-01-01T00:00:00Z"), ts("2025-02-03T00:00:00Z"));
    }
}
