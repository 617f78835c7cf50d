//! The GPU and provider state machines, and the one rule that decides whether a GPU is for sale.

use super::error::{MarketError, MarketResult};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum GpuStatus {
    Available,
    Busy,
    Offline,
    Maintenance,
}

impl GpuStatus {
    pub const ALL: [GpuStatus; 4] = [
        GpuStatus::Available,
        GpuStatus::Busy,
        GpuStatus::Offline,
        GpuStatus::Maintenance,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GpuStatus::Available => "available",
            GpuStatus::Busy => "busy",
            GpuStatus::Offline => "offline",
            GpuStatus::Maintenance => "maintenance",
        }
    }

    pub fn parse(text: &[u8]) -> MarketResult<GpuStatus> {
        GpuStatus::ALL
            .into_iter()
            .find(|s| text.eq_ignore_ascii_case(s.as_str().as_bytes()))
            .ok_or_else(|| {
                MarketError::syntax(format!(
                    "invalid GPU status '{}': expected available, busy, offline or maintenance",
                    super::input::shown(text, 64)
                ))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProviderStatus {
    /// A provider nobody has reported on yet is assumed online: registering GPUs is how a
    /// provider appears in the marketplace.
    #[default]
    Online,
    Offline,
    Maintenance,
}

impl ProviderStatus {
    pub const ALL: [ProviderStatus; 3] = [
        ProviderStatus::Online,
        ProviderStatus::Offline,
        ProviderStatus::Maintenance,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderStatus::Online => "online",
            ProviderStatus::Offline => "offline",
            ProviderStatus::Maintenance => "maintenance",
        }
    }

    pub fn parse(text: &[u8]) -> MarketResult<ProviderStatus> {
        ProviderStatus::ALL
            .into_iter()
            .find(|s| text.eq_ignore_ascii_case(s.as_str().as_bytes()))
            .ok_or_else(|| {
                MarketError::syntax(format!(
                    "invalid provider status '{}': expected online, offline or maintenance",
                    super::input::shown(text, 64)
                ))
            })
    }
}

/// A GPU is listed in the availability index exactly when it is available and its provider is
/// online. Every command that changes either side re-evaluates this one rule.
pub fn is_listed(gpu: GpuStatus, provider: ProviderStatus) -> bool {
    gpu == GpuStatus::Available && provider == ProviderStatus::Online
}

/// Checks a `GPUCACHE.STATUS` request against the state machine.
///
/// `busy` belongs to bookings: it is entered by `BOOK` and left by `CANCEL` (or the booking's
/// end), so a GPU holding a booking cannot be moved by hand, and `busy` cannot be set by hand —
/// not even on a GPU that is busy already. Setting any other current status again is allowed
/// (a no-op).
pub fn check_manual_transition(
    current: GpuStatus,
    active_booking: Option<&str>,
    target: GpuStatus,
) -> MarketResult<()> {
    if let Some(booking) = active_booking {
        if target != current {
            return Err(MarketError::InvalidTransition(format!(
                "GPU has active booking '{booking}': cancel it before setting {}",
                target.as_str()
            )));
        }
    }
    if target == GpuStatus::Busy {
        return Err(MarketError::InvalidTransition(
            "a GPU becomes busy only through GPUCACHE.BOOK".into(),
        ));
    }
    Ok(())
}

/// Checks that a GPU can take a new booking; the error says why not.
pub fn check_bookable(
    gpu_id: &str,
    status: GpuStatus,
    provider: ProviderStatus,
) -> MarketResult<()> {
    match status {
        GpuStatus::Busy => Err(MarketError::GpuBusy(format!(
            "GPU '{gpu_id}' is already booked"
        ))),
        GpuStatus::Offline | GpuStatus::Maintenance => Err(MarketError::GpuUnavailable(format!(
            "GPU '{gpu_id}' is {}",
            status.as_str()
        ))),
        GpuStatus::Available if provider != ProviderStatus::Online => {
            Err(MarketError::GpuUnavailable(format!(
                "provider of GPU '{gpu_id}' is {}",
                provider.as_str()
            )))
        }
        GpuStatus::Available => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GpuStatus::*;

    #[test]
    fn parses_case_insensitively_and_rejects_unknown() {
        assert_eq!(GpuStatus::parse(b"AVAILABLE").unwrap(), Available);
        assert_eq!(GpuStatus::parse(b"maintenance").unwrap(), Maintenance);
        assert!(GpuStatus::parse(b"free").is_err());
        assert!(GpuStatus::parse(b"").is_err());
        assert_eq!(
            ProviderStatus::parse(b"Offline").unwrap(),
            ProviderStatus::Offline
        );
        assert!(ProviderStatus::parse(b"busy").is_err());
    }

    #[test]
    fn only_available_gpus_of_online_providers_are_listed() {
        for gpu in GpuStatus::ALL {
            for provider in ProviderStatus::ALL {
                let expected = gpu == Available && provider == ProviderStatus::Online;
                assert_eq!(is_listed(gpu, provider), expected, "{gpu:?} {provider:?}");
            }
        }
    }

    #[test]
    fn a_booked_gpu_cannot_be_moved_by_hand() {
        let err = check_manual_transition(Busy, Some("b1"), Available).unwrap_err();
        assert!(matches!(err, MarketError::InvalidTransition(_)));
        assert!(check_manual_transition(Busy, Some("b1"), Offline).is_err());
    }

    #[test]
    fn busy_is_reserved_for_bookings() {
        // Even on a GPU that is busy already: `busy` is never set by hand.
        for (from, booking) in [
            (Available, None),
            (Offline, None),
            (Maintenance, None),
            (Busy, Some("b1")),
            (Busy, None),
        ] {
            let err = check_manual_transition(from, booking, Busy).unwrap_err();
            assert!(
                matches!(err, MarketError::InvalidTransition(_)),
                "{from:?} {booking:?}"
            );
        }
        for from in [Available, Offline, Maintenance] {
            for to in [Available, Offline, Maintenance] {
                assert!(check_manual_transition(from, None, to).is_ok());
            }
        }
    }

    #[test]
    fn bookable_only_when_available_and_provider_online() {
        assert!(check_bookable("g", Available, ProviderStatus::Online).is_ok());
        assert!(matches!(
            check_bookable("g", Busy, ProviderStatus::Online),
            Err(MarketError::GpuBusy(_))
        ));
        assert!(matches!(
            check_bookable("g", Offline, ProviderStatus::Online),
            Err(MarketError::GpuUnavailable(_))
        ));
        assert!(matches!(
            check_bookable("g", Available, ProviderStatus::Maintenance),
            Err(MarketError::GpuUnavailable(_))
        ));
    }
}
