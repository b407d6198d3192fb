//! Weights in transparent huge pages where the kernel offers them (Linux with THP in `madvise`
//! mode, the common default): decode streams every weight once per step, and with 4 KiB pages
//! every 4 KiB of it costs a page-table walk; with 2 MiB pages almost none do.

/// Matrices below this stay where they are (a huge page would mostly hold other data).
const MIN_BYTES: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// `data` moved into memory advised for huge pages (copied once, at load), or as it was where
/// that is not available or the matrix is small.
pub(crate) fn in_huge_pages<T: Copy>(data: Vec<T>) -> Vec<T> {
    let bytes = std::mem::size_of_val(data.as_slice());
    if bytes < MIN_BYTES || !cfg!(target_os = "linux") {
        return data;
    }
    let mut fresh: Vec<T> = Vec::with_capacity(data.len());
    #[cfg(target_os = "linux")]
    {
        // The whole huge pages inside the (not yet touched) allocation.
        let start = fresh.as_ptr() as usize;
        let first = start.next_multiple_of(HUGE_PAGE);
        let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > first {
            // SAFETY: [first, end) lies inside this allocation, which nothing else uses; the
            // advice changes how pages are backed, never their contents.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    fresh.extend_from_slice(&data);
    fresh
}

#[cfg(test)]
mod tests {
    #[test]
    fn contents_survive_the_move() {
        let v: Vec<f32> = (0..(3 << 20)).map(|i| i as f32).collect();
        let moved = super::in_huge_pages(v.clone());
        assert_eq!(moved, v);
        let small = vec![1u16, 2, 3];
        assert_eq!(super::in_huge_pages(small.clone()), small);
    }
}
