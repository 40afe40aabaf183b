import HMM

/// A driver object that handles invalidations of a notifier it owns.
protocol InvalidationTarget: AnyObject {
    func invalidate(_ notifier: IntervalNotifier, range: NotifierRange, sequence: UInt64) -> Bool
}

/// Notifier operations that refer to their target weakly, so the notifier (which the target owns) does
/// not keep it alive; once it is gone they only set the sequence. A mirror file's and an accelerator
/// context's.
final class WeakForwarder<Target: InvalidationTarget>: IntervalNotifierOperations, @unchecked Sendable {
    weak var target: Target?
    func invalidate(_ notifier: IntervalNotifier, range: NotifierRange, sequence: UInt64) -> Bool {
        guard let target else {
            notifier.setSequence(sequence)
            return true
        }
        return target.invalidate(notifier, range: range, sequence: sequence)
    }
}

extension MirrorFile: InvalidationTarget {}

/// The snapshot's temporary notifier: it only records the sequence.
final class SequenceOnlyNotifier: IntervalNotifierOperations, @unchecked Sendable {
    let lock = Locked(())
    func invalidate(_ notifier: IntervalNotifier, range: NotifierRange, sequence: UInt64) -> Bool {
        lock.withLock { _ in notifier.setSequence(sequence) }
        return true
    }
}
