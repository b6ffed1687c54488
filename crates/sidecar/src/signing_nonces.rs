//! Ed25519 signing nonces made ahead of the calls that use them, so an
//! assertion's signature costs the call one SHA-512 and a scalar
//! multiply-add instead of a base-point multiplication.
//!
//! An Ed25519 signature of `M` under secret scalar `a` (public `A = a·B`) is
//! `(R, S)` with `R = r·B`, `k = SHA-512(R ‖ A ‖ M) mod L` and
//! `S = r + k·a mod L`. Verifiers check `S·B = R + k·A` and cannot tell how
//! `r` was chosen; what keeps the key secret is that `r` is uniform mod `L`,
//! unknown to anyone else and never used for two messages. RFC 8032 gets that
//! by deriving `r` from the message, which puts `r·B` (most of a signature's
//! cost) on the call's path. Here a thread of its own ([`THREAD_NAME`]) makes
//! pairs `(r, R)` ahead of time. For the `n`th nonce of a key:
//!
//! 1. `h = SHA-512(prefix ‖ n ‖ 32 random bytes)`, where `prefix` is RFC
//!    8032's secret nonce key (the second half of `SHA-512(seed)`). `n` never
//!    repeats for a key (keys live as long as their process), so no two `h`
//!    are equal whatever the system RNG returns, and `prefix` keeps them
//!    unpredictable even if the RNG were known.
//! 2. `c` is the RFC 8032 secret scalar of the seed `h[..32]` (the clamped
//!    first half of its SHA-512) and `c·B` that seed's public key, which
//!    aws-lc computes with its base-point code (several times faster here than
//!    a portable multiplication).
//! 3. `r = ±c`, the sign from a bit of `h` the seed does not use; `-R` is `R`
//!    with the sign bit of its encoding flipped.
//!
//! Clamping leaves `c = 2^254 + 8x` with `x` uniform below `2^251`, so `c`
//! alone would reach only about half of the scalars mod `L` (a known one-bit
//! bias, enough for lattice attacks given many signatures). With the sign, `r`
//! divided by 8 mod `L` is uniform on `[2^251, 2^252)` or its negation
//! `(L - 2^252, L - 2^251]`, which together cover every scalar but
//! `L - 2^252 ≈ 2^124.4` of them, those at the seam twice: within `2^-126` of
//! uniform. Each nonce is taken out of the pool by value, used for one
//! signature and zeroed when dropped, as is the key.
//!
//! When the pool is empty (just after start, or calls outpacing the thread)
//! [`Presigner::sign`] returns `None` and the caller signs the RFC 8032 way.
//! The thread is woken once per batch of 32 nonces used (per half, in pools
//! under 64), not per call, and refills a batch at a time (≈ 0.6 ms of CPU
//! on the dev VM) at the lowest priority ([`NICE`]).

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use aws_lc_rs::digest;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use curve25519_dalek::scalar::{Scalar, clamp_integer};
use subtle::{Choice, ConditionallySelectable};
use zeroize::Zeroize;

/// How many nonces a pool holds when full unless told otherwise (64 bytes
/// each).
pub const DEFAULT_CAPACITY: usize = 1024;

/// The largest pool the sidecar's setting accepts (4 MiB of nonces).
pub const MAX_CAPACITY: usize = 65_536;

/// How many nonces the thread makes between taking the pool's lock.
const BATCH: usize = 32;

/// The name of the thread that makes nonces (at most 15 bytes: Linux's limit).
pub const THREAD_NAME: &str = "chaperone-nonce";

/// An Ed25519 key in the form signing needs: the secret scalar `a`, the nonce
/// key `prefix` and the encoded public key `A`. Zeroed when dropped.
struct ExpandedKey {
    scalar: Scalar,
    prefix: [u8; 32],
    public: [u8; 32],
}

impl ExpandedKey {
    /// RFC 8032 §5.1.5: `a` is the clamped first half of `SHA-512(seed)`,
    /// `prefix` its second half, `A = a·B` (computed by aws-lc). `None` if
    /// aws-lc refuses the seed (it takes any 32 bytes).
    fn from_seed(seed: &[u8; 32]) -> Option<Self> {
        let (scalar, public) = secret_scalar_and_public_key(seed)?;
        let mut hash = sha512(&[seed]);
        let mut prefix = [0u8; 32];
        prefix.copy_from_slice(&hash[32..]);
        hash.zeroize();
        Some(Self {
            scalar,
            prefix,
            public,
        })
    }
}

impl Drop for ExpandedKey {
    fn drop(&mut self) {
        self.scalar.zeroize();
        self.prefix.zeroize();
    }
}

/// One nonce: the secret `r` and the encoded `R = r·B`. Zeroed when dropped.
struct Nonce {
    secret: Scalar,
    point: [u8; 32],
}

impl Drop for Nonce {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

/// The nonces ready for use, and whether their maker should stop.
#[derive(Default)]
struct PoolState {
    ready: Vec<Nonce>,
    stopped: bool,
}

/// What the signing side and the nonce thread share.
#[derive(Default)]
struct Pool {
    /// How many nonces the pool holds when full.
    capacity: usize,
    state: Mutex<PoolState>,
    /// Signalled when the pool falls to its refill mark and when it is
    /// stopped.
    wanted: Condvar,
    /// Set once the thread has filled the pool for the first time (tests
    /// wait for it).
    filled_once: AtomicBool,
}

impl Pool {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            // Allocated once: growing would leave copies of unused nonces in
            // freed memory.
            state: Mutex::new(PoolState {
                ready: Vec::with_capacity(capacity),
                stopped: false,
            }),
            ..Self::default()
        }
    }

    /// The thread refills the pool when a call leaves this many: each time a
    /// batch has been used (half, in pools of fewer than two batches), so a
    /// refill takes ≈ 0.6 ms of CPU at a time rather than a burst.
    fn refill_at(&self) -> usize {
        self.capacity.saturating_sub(BATCH).max(self.capacity / 2)
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Nothing panics while holding the lock; a poisoned pool is still a
        // list of unused nonces.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one nonce, waking the thread when this leaves the refill mark.
    fn take(&self) -> Option<Nonce> {
        let mut state = self.lock();
        let nonce = state.ready.pop()?;
        // `pop` moved the nonce out but left its bytes in the slot.
        zero_spare(&mut state.ready, 1);
        if state.ready.len() == self.refill_at() {
            self.wanted.notify_one();
        }
        Some(nonce)
    }

    /// How many nonces are ready.
    fn len(&self) -> usize {
        self.lock().ready.len()
    }
}

/// Signs with nonces made ahead by its own thread. The thread stops when the
/// `Presigner` is dropped.
pub struct Presigner {
    key: Arc<ExpandedKey>,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for Presigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presigner")
            .field("ready", &self.pool.len())
            .finish_non_exhaustive()
    }
}

impl Presigner {
    /// A presigner for the Ed25519 key of `seed` whose pool holds
    /// `capacity` nonces, with its nonce thread started; `None` if aws-lc
    /// refuses the seed (it takes any 32 bytes). With `capacity` 0, or if the
    /// thread cannot be started, every [`Presigner::sign`] returns `None`.
    pub fn start(seed: &[u8; 32], capacity: usize) -> Option<Self> {
        let presigner = Self::without_thread(seed, capacity)?;
        if capacity == 0 {
            return Some(presigner);
        }
        let (key, pool) = (Arc::clone(&presigner.key), Arc::clone(&presigner.pool));
        let started = std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || make_nonces(&key, &pool));
        if let Err(error) = started {
            tracing::warn!(%error, "could not start the signing-nonce thread; every assertion is signed on the call's path");
        }
        Some(presigner)
    }

    /// A presigner whose pool stays empty until a thread fills it.
    fn without_thread(seed: &[u8; 32], capacity: usize) -> Option<Self> {
        Some(Self {
            key: Arc::new(ExpandedKey::from_seed(seed)?),
            pool: Arc::new(Pool::with_capacity(capacity)),
        })
    }

    /// The encoded public key `A` (equal to RFC 8032's for the same seed).
    pub fn public_key(&self) -> [u8; 32] {
        self.key.public
    }

    /// The Ed25519 signature `R ‖ S` of `message` with a nonce from the
    /// pool, or `None` when the pool is empty.
    pub fn sign(&self, message: &[u8]) -> Option<[u8; 64]> {
        let nonce = self.pool.take()?;
        let challenge = sha512(&[&nonce.point, &self.key.public, message]);
        let k = Scalar::from_bytes_mod_order_wide(&challenge);
        let s = k * self.key.scalar + nonce.secret;
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&nonce.point);
        signature[32..].copy_from_slice(s.as_bytes());
        Some(signature)
    }

    /// How many nonces are ready now.
    pub fn ready(&self) -> usize {
        self.pool.len()
    }

    /// Whether the thread has filled the pool at least once.
    pub fn filled_once(&self) -> bool {
        self.pool.filled_once.load(Ordering::Acquire)
    }
}

impl Drop for Presigner {
    fn drop(&mut self) {
        self.pool.lock().stopped = true;
        self.pool.wanted.notify_one();
    }
}

/// The nice value of the nonce thread: the lowest priority, so that where
/// the sidecar's cores are busy, refilling the pool waits for the threads
/// that serve calls instead of delaying them; the pool then runs dry and
/// calls sign on their path, counted.
pub const NICE: i32 = 19;

/// The nonce thread: fills the pool, then sleeps until a call leaves the
/// refill mark, until the pool is stopped.
fn make_nonces(key: &ExpandedKey, pool: &Pool) {
    lower_priority();
    let mut made: u64 = 0;
    let mut batch: Vec<Nonce> = Vec::with_capacity(BATCH);
    loop {
        let missing = {
            let mut state = pool.lock();
            while !state.stopped && state.ready.len() > pool.refill_at() {
                state = pool
                    .wanted
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.stopped {
                return;
            }
            pool.capacity - state.ready.len()
        };
        let mut added = 0;
        while added < missing {
            batch.extend((0..BATCH.min(missing - added)).filter_map(|_| {
                made += 1;
                nonce(key, made)
            }));
            if batch.is_empty() {
                tracing::error!(
                    "aws-lc refused every derived nonce seed; the nonce thread stops and assertions are signed on the call's path"
                );
                return;
            }
            added += batch.len();
            let mut state = pool.lock();
            if state.stopped {
                return;
            }
            state.ready.append(&mut batch);
            drop(state);
            // `append` copied the nonces and left their bytes behind.
            zero_spare(&mut batch, BATCH);
        }
        pool.filled_once.store(true, Ordering::Release);
    }
}

/// Gives this thread the lowest priority ([`NICE`]; Linux sets it per thread).
/// Lowering one's own priority needs no privilege; a failure is logged and
/// the thread runs at the process's priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE) {
        tracing::warn!(%error, "could not lower the signing-nonce thread's priority");
    }
}

/// The `n`th nonce of `key` (steps in the module's documentation); `None`
/// if aws-lc refuses the derived seed (it takes any 32 bytes).
fn nonce(key: &ExpandedKey, n: u64) -> Option<Nonce> {
    let mut random = [0u8; 32];
    // A failing RNG leaves zeros: `n` still keeps nonces distinct and
    // `prefix` unpredictable.
    let _ = aws_lc_rs::rand::fill(&mut random);
    let mut hash = sha512(&[&key.prefix, &n.to_le_bytes(), &random]);
    random.zeroize();
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&hash[..32]);
    let negate = hash[32] & 1;
    hash.zeroize();
    let derived = secret_scalar_and_public_key(&seed);
    seed.zeroize();
    let (magnitude, mut point) = derived?;
    // -(x, y) = (-x, y): the encoding's top bit is the sign of x. (x is 0
    // only for the identity, c·B for c ≡ 0 mod L: odds of 2^-251, and then
    // the signature would fail to verify, not leak.) Without a branch: the
    // sign is as secret as the nonce (known for many signatures, it is the
    // one-bit bias the sign is there to remove).
    point[31] ^= negate << 7;
    let secret = Scalar::conditional_select(&magnitude, &-magnitude, Choice::from(negate));
    Some(Nonce { secret, point })
}

/// The RFC 8032 secret scalar of `seed` (the clamped first half of its
/// SHA-512, reduced mod L) and its public key as aws-lc computes it.
fn secret_scalar_and_public_key(seed: &[u8; 32]) -> Option<(Scalar, [u8; 32])> {
    let pair = Ed25519KeyPair::from_seed_unchecked(seed).ok()?;
    let public = <[u8; 32]>::try_from(pair.public_key().as_ref()).ok()?;
    let mut hash = sha512(&[seed]);
    let mut lower = [0u8; 32];
    lower.copy_from_slice(&hash[..32]);
    hash.zeroize();
    let scalar = Scalar::from_bytes_mod_order(clamp_integer(lower));
    lower.zeroize();
    Some((scalar, public))
}

/// Zeroes the first `slots` unused slots of `nonces`' allocation (where
/// nonces moved out of it left their bytes).
fn zero_spare(nonces: &mut Vec<Nonce>, slots: usize) {
    for slot in nonces.spare_capacity_mut().iter_mut().take(slots) {
        *slot = MaybeUninit::zeroed();
    }
}

/// SHA-512 of the concatenation of `parts`.
fn sha512(parts: &[&[u8]]) -> [u8; 64] {
    let mut context = digest::Context::new(&digest::SHA512);
    for part in parts {
        context.update(part);
    }
    let mut out = [0u8; 64];
    out.copy_from_slice(context.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};

    use curve25519_dalek::edwards::EdwardsPoint;

    use super::*;

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_expanded_key_is_rfc_8032s() {
        // RFC 8032 §7.1, TEST 1: the secret key and the public key it gives.
        let seed: [u8; 32] =
            hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .try_into()
                .unwrap();
        let key = ExpandedKey::from_seed(&seed).unwrap();
        assert_eq!(
            key.public.to_vec(),
            hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        );
        // The scalar signatures are made with is the public key's discrete
        // log, for that seed and random ones.
        let mut keys = vec![key];
        for _ in 0..8 {
            let mut seed = [0u8; 32];
            aws_lc_rs::rand::fill(&mut seed).unwrap();
            keys.push(ExpandedKey::from_seed(&seed).unwrap());
        }
        for key in keys {
            assert_eq!(
                EdwardsPoint::mul_base(&key.scalar).compress().to_bytes(),
                key.public
            );
        }
    }

    #[test]
    fn nonces_are_their_points_discrete_logs_and_unbiased() {
        let key = ExpandedKey::from_seed(&[3; 32]).unwrap();
        let eighth = Scalar::from(8u8).invert();
        let mut upper_half = 0;
        let mut points = HashSet::new();
        for n in 1..=256 {
            let nonce = nonce(&key, n).unwrap();
            assert_eq!(
                EdwardsPoint::mul_base(&nonce.secret).compress().to_bytes(),
                nonce.point,
                "nonce {n}: R is not r·B"
            );
            assert!(points.insert(nonce.point), "nonce {n} repeats");
            // r/8 lies in [2^251, 2^252) for +c and near below 2^251 for -c:
            // both must occur, about as often, or r is biased (module doc).
            let top = (nonce.secret * eighth).to_bytes()[31];
            assert!(top < 0x10, "r/8 = ±c/8 is below 2^252");
            if top >= 0x08 {
                upper_half += 1;
            }
        }
        assert!(
            (96..=160).contains(&upper_half),
            "{upper_half} of 256 nonces have r = +c: the sign is not random"
        );
    }

    #[test]
    fn pooled_signatures_verify_and_never_share_a_nonce() {
        let mut seed = [0u8; 32];
        aws_lc_rs::rand::fill(&mut seed).unwrap();
        let presigner = Presigner::start(&seed, DEFAULT_CAPACITY).unwrap();
        let public = UnparsedPublicKey::new(&ED25519, presigner.public_key());
        let reference = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        wait_until("the pool is full", || presigner.filled_once());
        let mut points = HashSet::new();
        // More signatures than the pool holds: the thread refills it between.
        let mut signed = 0;
        while signed < 3 * DEFAULT_CAPACITY {
            let message = format!("eyJhbGciOiJFZERTQSJ9.call-{signed}");
            let Some(signature) = presigner.sign(message.as_bytes()) else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            public
                .verify(message.as_bytes(), &signature)
                .expect("a pooled signature verifies with the RFC 8032 verifier");
            assert!(
                public.verify(b"another message", &signature).is_err(),
                "it holds for its own message only"
            );
            assert_ne!(
                signature.as_slice(),
                reference.sign(message.as_bytes()).as_ref(),
                "the nonce came from the pool, not from the message"
            );
            assert!(
                points.insert(<[u8; 32]>::try_from(&signature[..32]).unwrap()),
                "a nonce was used twice"
            );
            signed += 1;
        }
    }

    #[test]
    fn the_thread_refills_a_batch_at_a_time_and_stops_with_the_presigner() {
        // A pool of 64 is refilled at half; a larger one each time a batch
        // has been used.
        for (capacity, refill_at) in [(64, 32), (DEFAULT_CAPACITY, DEFAULT_CAPACITY - BATCH)] {
            let presigner = Presigner::start(&[7; 32], capacity).unwrap();
            wait_until("the pool is full", || presigner.filled_once());
            assert_eq!(presigner.ready(), capacity);
            // Down to one above the mark: no refill.
            for _ in 0..capacity - refill_at - 1 {
                presigner.sign(b"m").unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(presigner.ready(), refill_at + 1, "pool of {capacity}");
            // The call that reaches the mark wakes the thread, which fills up.
            presigner.sign(b"m").unwrap();
            wait_until("the pool is full again", || presigner.ready() == capacity);
            let pool = Arc::downgrade(&presigner.pool);
            drop(presigner);
            wait_until("the thread let go of the pool", || pool.upgrade().is_none());
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_thread_runs_at_the_lowest_priority() {
        let presigner = Presigner::start(&[5; 32], 64).unwrap();
        wait_until("the pool is full", || presigner.filled_once());
        // /proc/self/task/TID/stat: field 19 is the nice value (fields
        // counted after the parenthesised name, which may hold spaces).
        let nice_of_threads: Vec<(String, i32)> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let path = task.ok()?.path();
                let name = std::fs::read_to_string(path.join("comm")).ok()?;
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                Some((name.trim().to_owned(), fields.get(16)?.parse().ok()?))
            })
            .collect();
        let nonce_threads: Vec<i32> = nice_of_threads
            .iter()
            .filter(|(name, _)| name == THREAD_NAME)
            .map(|(_, nice)| *nice)
            .collect();
        assert!(!nonce_threads.is_empty(), "{nice_of_threads:?}");
        assert!(
            nonce_threads.iter().all(|nice| *nice == NICE),
            "{nice_of_threads:?}"
        );
        // This (test) thread keeps its own priority.
        assert!(
            nice_of_threads
                .iter()
                .any(|(name, nice)| name != THREAD_NAME && *nice != NICE),
            "{nice_of_threads:?}"
        );
    }

    #[test]
    fn an_empty_pool_signs_nothing() {
        let presigner = Presigner::start(&[1; 32], 0).unwrap();
        assert_eq!(presigner.sign(b"m"), None);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(presigner.ready(), 0, "no pool, no thread");
    }
}
