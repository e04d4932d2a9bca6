//! The queue between callers and the writer thread, with a doorbell that wakes
//! the writer once per group rather than once per append.
//!
//! A plain channel wakes a blocked receiver on every send: a futex call for the
//! sender and a context switch for the writer, per append, on the hot path. Here
//! the writer says how many appends it is waiting for, and only the send that
//! brings the queue to that count rings. The count and the threshold are both
//! sequentially consistent atomics, so either the sender sees the threshold it
//! reached, or the writer sees the count before parking: no wake-up is lost.

use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::SeqCst};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::writer::Queued;

/// How often an idle writer looks at the queue even without a ring.
const IDLE_RECHECK: Duration = Duration::from_millis(100);

/// How long a writer of lone appends that found the queue empty keeps looking
/// before it sleeps. A caller that just got its answer usually sends its next
/// append within this time; a writer still awake takes it with no wake-up,
/// which on a virtual machine costs more than the append's own work.
const SPIN: Duration = Duration::from_micros(100);

/// Whether the machine has a core to spare for a short look before sleeping:
/// on one core, looking only delays the thread that would answer.
pub fn spare_core() -> bool {
    static SPARE: OnceLock<bool> = OnceLock::new();
    *SPARE.get_or_init(|| std::thread::available_parallelism().is_ok_and(|cores| cores.get() > 1))
}

/// Creates a connected sender and receiver.
pub fn job_queue() -> (JobSender, JobReceiver) {
    let (sender, receiver) = mpsc::channel();
    let bell = Arc::new(Doorbell {
        pending: AtomicIsize::new(0),
        ring_at: AtomicIsize::new(isize::MAX),
        closed: AtomicBool::new(false),
        writer: OnceLock::new(),
    });
    (
        JobSender {
            sender,
            bell: Arc::clone(&bell),
        },
        JobReceiver { receiver, bell },
    )
}

struct Doorbell {
    /// Jobs sent and not yet received. May dip below zero for a moment, as the
    /// writer can receive a job before its sender counts it.
    pending: AtomicIsize,
    /// The pending count at which a sender wakes the writer; `isize::MAX` while
    /// the writer is not waiting.
    ring_at: AtomicIsize,
    closed: AtomicBool,
    writer: OnceLock<Thread>,
}

impl Doorbell {
    fn ring(&self) {
        if let Some(writer) = self.writer.get() {
            writer.unpark();
        }
    }
}

/// The writer thread has exited: nothing will take the job.
#[derive(Debug)]
pub struct WriterGone;

/// The callers' end. Dropping it lets the writer finish the queue and stop.
pub struct JobSender {
    sender: mpsc::Sender<Queued>,
    bell: Arc<Doorbell>,
}

impl JobSender {
    /// Enqueues a job, waking the writer if it waits for this many.
    pub fn send(&self, job: Queued) -> Result<(), WriterGone> {
        self.sender.send(job).map_err(|_| WriterGone)?;
        let pending = self.bell.pending.fetch_add(1, SeqCst) + 1;
        if pending >= self.bell.ring_at.load(SeqCst) {
            self.bell.ring();
        }
        Ok(())
    }
}

impl Drop for JobSender {
    fn drop(&mut self) {
        self.bell.closed.store(true, SeqCst);
        self.bell.ring();
    }
}

/// The writer's end.
pub struct JobReceiver {
    receiver: mpsc::Receiver<Queued>,
    bell: Arc<Doorbell>,
}

impl JobReceiver {
    /// Registers the calling thread as the one to wake. Call it from the writer.
    pub fn attach_to_current_thread(&self) {
        let _ = self.bell.writer.set(std::thread::current());
    }

    /// The next job, waiting for one; `None` once the sender is gone and the
    /// queue is empty. With `spin`, it looks for a while before sleeping: for a
    /// writer of lone appends, whose next one comes soon. A writer of groups
    /// does not, as its callers need the processor to prepare the next group.
    pub fn recv(&self, spin: bool) -> Option<Queued> {
        if spin {
            let until = Instant::now() + SPIN;
            while Instant::now() < until {
                if let Some(job) = self.try_recv() {
                    return Some(job);
                }
                std::hint::spin_loop();
            }
        }
        loop {
            if let Some(job) = self.try_recv() {
                return Some(job);
            }
            if self.bell.closed.load(SeqCst) {
                return self.try_recv();
            }
            self.wait_for(1, None);
        }
    }

    /// The next job if one is queued.
    pub fn try_recv(&self) -> Option<Queued> {
        match self.receiver.try_recv() {
            Ok(job) => {
                self.bell.pending.fetch_sub(1, SeqCst);
                Some(job)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }

    /// Sleeps until at least `count` jobs are queued, the deadline passes, or
    /// the sender is gone. May return early; callers re-check the queue.
    pub fn wait_for(&self, count: usize, deadline: Option<Instant>) {
        let count = isize::try_from(count).unwrap_or(isize::MAX);
        self.bell.ring_at.store(count, SeqCst);
        let ready = self.bell.pending.load(SeqCst) >= count || self.bell.closed.load(SeqCst);
        if !ready {
            match deadline {
                // Bounded even when idle: a store dropped before the writer thread
                // registered itself rings no one, and the writer must still see
                // `closed` and stop.
                None => std::thread::park_timeout(IDLE_RECHECK),
                Some(deadline) => {
                    std::thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
                }
            }
        }
        self.bell.ring_at.store(isize::MAX, SeqCst);
    }
}
