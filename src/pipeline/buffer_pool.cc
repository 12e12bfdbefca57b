#include "pipeline/buffer_pool.h"

#include <algorithm>
#include <new>

namespace sluice::pipeline {

size_t BatchStorage::used_bytes() const {
  size_t end = 0;
  for (size_t i = 0; i < field_offset.size(); ++i)
    end = std::max(end, field_offset[i] + field_bytes[i]);
  return end;
}

BufferPool::BufferPool(size_t budget, size_t max_held, bool pin)
    : budget_(budget), max_held_(max_held), pin_(pin) {}

std::unique_ptr<BatchStorage> BufferPool::acquire(const bool& stop, std::mutex& stop_mu,
                                                  std::condition_variable& stop_cv) {
  std::unique_lock lock(stop_mu);
  {
    std::lock_guard pool_lock(mu_);
    waiter_cv_ = &stop_cv;
  }
  while (true) {
    {
      std::lock_guard pool_lock(mu_);
      if (!free_.empty()) {
        auto s = std::move(free_.back());
        free_.pop_back();
        return s;
      }
      if (total_ - with_consumer_ < budget_ && total_ < budget_ + max_held_) {
        ++total_;
        auto s = std::make_unique<BatchStorage>();
        s->data.set_pin(pin_);
        return s;
      }
    }
    if (stop) return nullptr;
    stop_cv.wait_for(lock, std::chrono::milliseconds(50));
  }
}

void BufferPool::release(std::unique_ptr<BatchStorage> storage) {
  // Notify under the pool lock so that detach() cannot return while a notify is under way.
  std::lock_guard lock(mu_);
  if (free_.size() < budget_)
    free_.push_back(std::move(storage));
  else
    --total_;  // the consumer held more than the budget; give the memory back
  if (waiter_cv_) waiter_cv_->notify_all();
}

void BufferPool::detach() {
  std::lock_guard lock(mu_);
  waiter_cv_ = nullptr;
}

void BufferPool::note_delivered() {
  std::lock_guard lock(mu_);
  ++with_consumer_;
}

void BufferPool::note_returned_from_consumer() {
  std::lock_guard lock(mu_);
  --with_consumer_;
}

size_t BufferPool::held() const {
  std::lock_guard lock(mu_);
  return with_consumer_;
}

bool BufferPool::exhausted_by_consumer() const {
  std::lock_guard lock(mu_);
  return free_.empty() && total_ >= budget_ + max_held_ && with_consumer_ >= max_held_;
}

}  // namespace sluice::pipeline
