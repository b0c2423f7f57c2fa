#pragma once
// Overloaded{lambdas...}: one visitor for std::visit built from one lambda per alternative, so a
// variant alternative nobody handles is a compile error. Header-only; usable from any thread.

namespace kb {

template <class... Handlers>
struct Overloaded : Handlers... {
  using Handlers::operator()...;
};
template <class... Handlers>
Overloaded(Handlers...) -> Overloaded<Handlers...>;

}  // namespace kb
