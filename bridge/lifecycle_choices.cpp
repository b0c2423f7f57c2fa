// What a site says a user may choose (GET /v1/sites/{site}/options): the user's projects and the
// site's published queues from UNICORE's user info, asked with the user's own token and kept for
// five minutes, so that a page opening and a kernel starting do not each cost a request.
#include <spdlog/spdlog.h>

#include "bridge/lifecycle.hpp"

namespace kb::bridge {

namespace {
constexpr std::chrono::minutes kChoicesLifetime{5};
}

void KernelLifecycle::user_choices(const Caller& caller, const std::string& site,
                                   ChoicesCallback done) {
  const std::string key = caller.user + "\n" + site;
  if (auto it = choices_.find(key);
      it != choices_.end() && Clock::now() - it->second.fetched_at < kChoicesLifetime) {
    done(it->second);
    return;
  }
  UserSiteChoices none;
  none.fetched_at = Clock::now();
  auto backend = backends_.find(site);
  if (backend == backends_.end()) {
    none.note = "site " + site + " is not configured";
    done(none);
    return;
  }
  auto token = credentials_.token(caller.user);
  if (!token) {
    none.note = "the bridge holds no UNICORE token of user " + caller.user +
                ", so it cannot ask site " + site +
                " which projects the user may charge (JupyterHub pushes one at login: PUT "
                "/v1/users/" +
                caller.user + "/credentials)";
    done(none);
    return;
  }
  std::weak_ptr<bool> alive = alive_;
  const std::string user = caller.user;
  backend->second->get_core_info(
      unicore::Credentials::bearer(*token),
      [this, alive, key, user, site, done](unicore::Result<unicore::CoreInfo> r) {
        if (alive.expired()) return;
        UserSiteChoices c;
        c.fetched_at = Clock::now();
        if (!r) {
          c.note = "site " + site + " did not say which projects user " + user +
                   " may charge: " + r.error().message;
          spdlog::warn("{}", c.note);
          done(c);  // not cached: the next page load asks again
          return;
        }
        c.projects = r->available_groups;
        c.default_project = r->group;
        c.queues = r->queues;
        choices_[key] = c;
        done(c);
      });
}

std::optional<std::vector<std::string>> KernelLifecycle::known_projects(
    const std::string& user, const std::string& site) const {
  auto it = choices_.find(user + "\n" + site);
  if (it == choices_.end() || Clock::now() - it->second.fetched_at >= kChoicesLifetime) {
    return std::nullopt;
  }
  return it->second.projects;
}

}  // namespace kb::bridge
